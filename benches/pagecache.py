"""Page-cache helpers shared by the Python benchmark scripts (no root needed)."""
import os


def shard_paths(folder):
    """The .safetensors files of a checkpoint folder, sorted: those its
    model.safetensors.index.json names where it has one (a folder may hold other files
    beside the shards, such as Mistral's consolidated.safetensors), else every one."""
    import json

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = set(json.load(f)["weight_map"].values())
        return sorted(os.path.join(folder, n) for n in names)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def evict(paths):
    """Drops each file from the page cache: flush, then POSIX_FADV_DONTNEED."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths):
    """Reads each file once, so that it is in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
