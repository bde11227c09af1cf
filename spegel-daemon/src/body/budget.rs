//! A byte budget shared by the buffers of verify-before-send (memory) or the files of its spool
//! (disk): a share is taken for a whole object before its first byte is read, and given back
//! when the [`Share`] is dropped — by the response body, once its bytes have been handed on.
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting unit: one permit per 64 KiB (a `u32` of units covers any object size).
const UNIT: u64 = 64 << 10;

/// A fixed number of bytes, handed out in [`Share`]s without waiting.
#[derive(Clone)]
pub struct Budget {
    units: Arc<Semaphore>,
}

/// Part of a [`Budget`], returned when dropped.
#[derive(Debug)]
pub struct Share {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    /// A budget of `bytes` (rounded down to whole units; 0 gives nothing out).
    pub fn new(bytes: u64) -> Self {
        let units = usize::try_from(bytes / UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
        }
    }

    /// A share for an object of `bytes` (an empty one takes one unit too), or `None` when the
    /// budget cannot cover it now.
    pub fn try_take(&self, bytes: u64) -> Option<Share> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        let permit = Arc::clone(&self.units).try_acquire_many_owned(units).ok()?;
        Some(Share { _permit: permit })
    }

    /// Bytes not handed out.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_taken_whole_and_returned_on_drop() {
        let budget = Budget::new(4 * UNIT);
        let a = budget.try_take(2 * UNIT + 1).expect("fits");
        assert_eq!(budget.available(), UNIT);
        assert!(budget.try_take(2 * UNIT).is_none(), "never more than left");
        let b = budget.try_take(0).expect("an empty object takes one unit");
        assert_eq!(budget.available(), 0);
        drop(a);
        drop(b);
        assert_eq!(budget.available(), 4 * UNIT);
        assert!(
            Budget::new(UNIT - 1).try_take(1).is_none(),
            "0 gives nothing"
        );
        assert!(budget.try_take(u64::MAX).is_none());
    }
}
