#!/usr/bin/env python3
"""Docker's own default seccomp profile plus the three io_uring calls, and userfaultfd in
user mode only, made at use time.

tensorlift ships its own profile (seccomp-io-uring.json). If you would rather keep Docker's
default profile exactly and only allow io_uring (and userfaultfd with UFFD_USER_MODE_ONLY,
which host loads use to fill fresh memory by copying cached pages in) on top of it, make
that profile yourself:

  python3 docker/seccomp-from-default.py > seccomp-default-io-uring.json
  python3 docker/seccomp-from-default.py --input default.json > seccomp-default-io-uring.json

With no --input it downloads the default profile of the moby project (needs network).
"""
import argparse
import json
import sys
import urllib.request

DEFAULT_URL = "https://raw.githubusercontent.com/moby/moby/master/profiles/seccomp/default.json"
IO_URING = ["io_uring_enter", "io_uring_register", "io_uring_setup"]
# userfaultfd(flags) only where flags & UFFD_USER_MODE_ONLY (1): the default profile allows it
# with CAP_SYS_PTRACE alone; without the flag a fault taken by the kernel can be made to wait.
USERFAULTFD_USER_MODE = {
    "names": ["userfaultfd"],
    "action": "SCMP_ACT_ALLOW",
    "args": [{"index": 0, "value": 1, "valueTwo": 1, "op": "SCMP_CMP_MASKED_EQ"}],
    "comment": "userfaultfd in user mode only, for tensorlift",
}


def with_io_uring(profile):
    """The profile with allow rules for the io_uring calls and user-mode userfaultfd appended
    (idempotent)."""
    rules = profile.setdefault("syscalls", [])
    allowed = {n for r in rules if r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args") and not r.get("includes") for n in r.get("names", [])}
    missing = [n for n in IO_URING if n not in allowed]
    if missing:
        rules.append({"names": missing, "action": "SCMP_ACT_ALLOW", "comment": "io_uring, for tensorlift"})
    if not any(r.get("args") == USERFAULTFD_USER_MODE["args"] and r.get("names") == ["userfaultfd"] for r in rules):
        rules.append(dict(USERFAULTFD_USER_MODE))
    return profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="a seccomp profile file (default: download Docker's default)")
    ap.add_argument("--url", default=DEFAULT_URL)
    a = ap.parse_args()
    if a.input:
        with open(a.input) as f:
            profile = json.load(f)
    else:
        with urllib.request.urlopen(a.url, timeout=30) as r:
            profile = json.load(r)
    json.dump(with_io_uring(profile), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
