//! Waking log readers after a caller's own transaction committed appends.
//!
//! The driver's transaction type cannot say whether this very transaction
//! appended, so the store counts appends made inside transactions and, after
//! any commit through the store, wakes readers when the count moved since the
//! last such wake-up. A wake-up that comes early (another transaction's
//! commit) is followed by the readers' quick re-checks, so none is lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// The count of appends made in transactions, and the count last woken for.
#[derive(Debug, Default)]
pub(crate) struct AppendWakes {
    appended: AtomicU64,
    woken: AtomicU64,
}

impl AppendWakes {
    /// Counts an append made inside a caller's transaction.
    pub(crate) fn appended(&self) {
        self.appended.fetch_add(1, Ordering::AcqRel);
    }

    /// After a commit: whether readers must be woken (appends were made in
    /// transactions since the last wake-up).
    pub(crate) fn committed(&self) -> bool {
        let appended = self.appended.load(Ordering::Acquire);
        self.woken.swap(appended, Ordering::AcqRel) != appended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_wakes_once_per_batch_of_appends() {
        let wakes = AppendWakes::default();
        assert!(!wakes.committed(), "nothing appended");
        wakes.appended();
        wakes.appended();
        assert!(wakes.committed());
        assert!(!wakes.committed(), "already woken for those");
        wakes.appended();
        assert!(wakes.committed());
    }
}
