//! Which process made a value: [`MadeIn`].

/// The process a value was made in. A process forked from that one (Python's
/// multiprocessing, a data loader's workers) has none of its threads, and shares its
/// descriptors with it (io_uring rings, eventfds, sockets, a userfaultfd that serves the
/// parent's address space): there, such a value is not used as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MadeIn(u32);

impl MadeIn {
    /// This process.
    pub(crate) fn here() -> MadeIn {
        MadeIn(std::process::id())
    }

    /// Whether this is another process than the one it was made in (a forked one).
    pub(crate) fn elsewhere(self) -> bool {
        self != MadeIn::here()
    }
}
