//! Run-time facts about the I/O environment, probed once and reported with reasons.

use std::fmt;
use std::io;
use std::sync::OnceLock;

/// Whether io_uring can be used here, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UringStatus {
    /// A ring could be created and supports the reads we issue.
    Available,
    /// It cannot be used.
    Unavailable {
        /// The errno the kernel returned, if the failure came from a system call.
        errno: Option<i32>,
        /// What it means and what to do about it.
        reason: String,
    },
}

impl fmt::Display for UringStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UringStatus::Available => f.write_str("available"),
            UringStatus::Unavailable { reason, .. } => write!(f, "unavailable: {reason}"),
        }
    }
}

/// The io_uring status of this process, probed on first use.
pub fn uring_status() -> &'static UringStatus {
    static STATUS: OnceLock<UringStatus> = OnceLock::new();
    STATUS.get_or_init(probe_uring)
}

fn probe_uring() -> UringStatus {
    let ring = match io_uring::IoUring::new(8) {
        Ok(r) => r,
        Err(e) => return unavailable(&e),
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return unavailable(&e);
    }
    for (code, name) in [(io_uring::opcode::Read::CODE, "READ"), (io_uring::opcode::ReadFixed::CODE, "READ_FIXED")] {
        if !probe.is_supported(code) {
            return UringStatus::Unavailable {
                errno: None,
                reason: format!("the kernel's io_uring lacks IORING_OP_{name} (needs Linux 5.6 or later)"),
            };
        }
    }
    UringStatus::Available
}

/// Classifies a failure to create or use a ring.
pub(crate) fn unavailable(e: &io::Error) -> UringStatus {
    UringStatus::Unavailable { errno: e.raw_os_error(), reason: unavailable_reason(e) }
}

/// What a failure to create or use a ring means, and what to do about it.
pub(crate) fn unavailable_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (ENOSYS)".to_owned(),
        Some(libc::EPERM) => {
            "io_uring is refused (EPERM): a seccomp profile such as Docker's default, or the kernel.io_uring_disabled sysctl".to_owned()
        }
        Some(libc::ENOMEM) => {
            "io_uring memory is refused (ENOMEM): RLIMIT_MEMLOCK is too low (raise `ulimit -l`, or run Docker with --ulimit memlock=-1)".to_owned()
        }
        _ => format!("io_uring setup failed: {e}"),
    }
}

/// RLIMIT_MEMLOCK in bytes (`None` means unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memlock {
    /// The soft limit, which applies.
    pub soft: Option<u64>,
    /// The hard limit, up to which a process may raise the soft one.
    pub hard: Option<u64>,
}

/// The process's RLIMIT_MEMLOCK, or `None` if it cannot be read.
pub fn memlock() -> Option<Memlock> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the valid rlimit struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return None;
    }
    let v = |x: libc::rlim_t| (x != libc::RLIM_INFINITY).then_some(x);
    Some(Memlock { soft: v(lim.rlim_cur), hard: v(lim.rlim_max) })
}

/// Whether this process holds `CAP_IPC_LOCK` where the kernel looks for it (`None` where
/// that cannot be read): then memory it locks, and io_uring's registered buffers, are not
/// counted against RLIMIT_MEMLOCK. The kernel asks in the initial user namespace, so a
/// process in another (a rootless or unprivileged container, `unshare -r`), whose effective
/// set is its own namespace's, holds it only there: not counted as holding it.
pub fn has_cap_ipc_lock() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    // The initial namespace maps every id to itself.
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").ok()?;
    let initial = uid_map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    // CAP_IPC_LOCK is capability 14 (linux/capability.h).
    Some(initial && caps & (1 << 14) != 0)
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned())
}

/// Host memory this process can fill now, in bytes: the kernel's `MemAvailable` plus free
/// swap, lowered to what the process's cgroup (v2) still allows. `None` when none of that
/// can be read.
///
/// Anonymous memory is committed when it is first touched, not when it is mapped, so an
/// allocation larger than this succeeds and the process is killed later, mid-load. Loads
/// compare the memory a checkpoint asks for with this figure first.
pub fn host_memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.as_deref()?.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
    };
    let system = field("MemAvailable:").map(|a| a + field("SwapFree:").unwrap_or(0));
    let cgroup = cgroup_headroom();
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What this process's memory cgroup still allows: `memory.max - memory.current` (v2), or
/// `memory.limit_in_bytes - memory.usage_in_bytes` (v1); `None` without a limit.
fn cgroup_headroom() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |dir: &std::path::Path, file: &str| -> Option<u64> {
        // "max" (v2, no limit) does not parse; v1 writes a huge number for no limit.
        std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    };
    let under = |root: &str, rel: &str| std::path::Path::new(root).join(rel.trim().trim_start_matches('/'));
    let v1 = groups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p));
    let (max, current) = match v1 {
        Some(rel) => {
            let dir = under("/sys/fs/cgroup/memory", rel);
            (read(&dir, "memory.limit_in_bytes")?, read(&dir, "memory.usage_in_bytes")?)
        }
        None => {
            let dir = under("/sys/fs/cgroup", groups.lines().find_map(|l| l.strip_prefix("0::"))?);
            (read(&dir, "memory.max")?, read(&dir, "memory.current")?)
        }
    };
    Some(max.saturating_sub(current))
}

/// Whether `bytes` more bytes of memory can be had right now: within the memory available
/// ([`host_memory_available`]), and found by reserving them (without touching them) and
/// giving them back.
///
/// Parsing a header or building a million tensors makes many small allocations, and any of
/// them failing aborts the process. Reserving their estimated total first, where failure is
/// an error, turns an address-space or overcommit limit into an error before that work
/// starts.
pub fn can_allocate(bytes: u64) -> bool {
    // Address space (an `RLIMIT_AS`, strict overcommit) answers a reservation; memory that
    // is committed only when touched (a cgroup limit, overcommit) answers MemAvailable.
    if host_memory_available().is_some_and(|a| bytes > a) {
        return false;
    }
    let Ok(bytes) = usize::try_from(bytes) else { return false };
    Vec::<u8>::new().try_reserve_exact(bytes).is_ok()
}

/// Which pages a 32 MiB sample of fresh memory filled faster here: transparent huge pages
/// or base pages. `doctor` reports it; a load does not decide by it, since a sample does not
/// say how a load's gigabytes of fresh huge pages will fill (see `HugePages::Auto`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageChoice {
    /// Whether huge pages filled the sample at least twice as fast.
    pub huge: bool,
    /// First-touch throughput of fresh huge-page memory, GB/s.
    pub huge_gbps: f64,
    /// First-touch throughput of fresh base-page memory, GB/s.
    pub base_gbps: f64,
}

static PAGE_CHOICE: std::sync::OnceLock<PageChoice> = std::sync::OnceLock::new();

/// Measures, once per process, how fast fresh memory is faulted in and zeroed with huge
/// pages and with base pages (32 MiB each), and whether huge pages were at least twice as
/// fast. Huge pages are often several times faster on such a sample; on a virtual machine
/// whose idle memory went back to its host, or once the kernel's ready huge pages run out,
/// a large allocation's can be several times slower.
pub fn page_probe() -> &'static PageChoice {
    PAGE_CHOICE.get_or_init(|| {
        const LEN: usize = 32 << 20;
        let touch = |huge: bool| -> f64 {
            let Some(mut buf) = crate::AlignedBuf::zeroed_pages(LEN, 2 << 20, huge) else { return 0.0 };
            let t = std::time::Instant::now();
            let s = buf.as_mut_slice();
            for i in (0..s.len()).step_by(crate::PAGE) {
                s[i] = 1;
            }
            let secs = t.elapsed().as_secs_f64().max(1e-9);
            std::hint::black_box(&buf);
            LEN as f64 / secs / 1e9
        };
        let base_gbps = touch(false);
        let huge_gbps = touch(true);
        // Huge pages only when clearly faster: when the 32 MiB sample met ready memory but
        // the rest of a load meets memory the host took back, they are several times slower.
        let c = PageChoice { huge: huge_gbps >= 2.0 * base_gbps, huge_gbps, base_gbps };
        tracing::debug!(?c, "host pages chosen");
        c
    })
}
