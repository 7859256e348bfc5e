//! Memory the proxy allows itself: the bytes all forwarded requests together may hold for a
//! replay after a 401 (`retry.max_buffered_total`; it lives with the upstream client because
//! that client is the one object every forwarded request shares), and hyper's buffer per
//! connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most bytes hyper buffers per connection, client or upstream (and so the longest request head:
/// 431 beyond it). hyper's default, about 400 KiB, would let every streaming upload hold that
/// much; nginx allows 32 KiB of headers by default.
pub const CONNECTION_BUFFER: usize = 64 * 1024;

/// The bytes all requests together hold for replay, so that many large uploads at once
/// cannot exhaust memory (`retry.max_buffered_total`).
#[derive(Debug, Default)]
pub struct ReplayBudget {
    used: AtomicU64,
}

impl ReplayBudget {
    /// Bytes held for replay now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes taken from a [`ReplayBudget`]; given back when dropped (when the request ends).
#[derive(Debug)]
pub struct Reservation {
    budget: Option<Arc<ReplayBudget>>,
    bytes: u64,
}

impl Reservation {
    /// A reservation of nothing.
    pub fn none() -> Self {
        Self {
            budget: None,
            bytes: 0,
        }
    }

    pub fn new(budget: &Arc<ReplayBudget>) -> Self {
        Self {
            budget: Some(Arc::clone(budget)),
            bytes: 0,
        }
    }

    /// Grows the reservation to `total` bytes if the budget allows `cap` in all; false (and
    /// unchanged) if it does not.
    pub fn grow_to(&mut self, total: u64, cap: u64) -> bool {
        let Some(budget) = &self.budget else {
            return false;
        };
        let extra = total.saturating_sub(self.bytes);
        let granted = budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(extra).filter(|sum| *sum <= cap)
            })
            .is_ok();
        if granted {
            self.bytes += extra;
        }
        granted
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}
