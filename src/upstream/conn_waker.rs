//! The waker a pooled upstream connection is polled with while a request uses it.
//!
//! A pooled HTTP/1.1 connection has no task of its own: the request using it polls it
//! (`pool.rs`). hyper's connection keeps the waker it was polled with in its socket's
//! registration and in its channels, and some of those are woken by the request's own next
//! step, in the same poll of the same task. Taking the answer's last body chunk wakes the
//! body's sender even once the sender is gone (hyper's `body::chan`), and handing over the
//! answer's head wakes whoever polled for it. With the task's own waker in those places,
//! every request's task was scheduled and polled a third time for nothing: the client
//! connection's whole future, ~4 % of a request's instructions.
//!
//! So the connection is polled with a waker of its own. A wake that comes while the request
//! is polling the connection, on the polling thread, is answered by polling it again at once
//! (when the poll was pending); one that comes at any other time (the socket is readable, a
//! timer fired) or from another thread wakes the request's task as before.
//!
//! Telling the two apart takes no atomic read-modify-write (~20 cycles each, on every poll):
//! the connection being polled is noted in a thread-local, since only the polling thread can
//! wake it in the middle of its own poll. The task is registered on every poll, as
//! `AtomicWaker` requires: skipping a registration it already held lost wakes in a race
//! where a wake from another thread lands while the task registers (`AtomicWaker` then wakes
//! and empties itself, and a flag set beside it by the waking thread can come too late).

use std::cell::Cell;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// How many times one poll polls again for wakes it caused itself before it hands the wake to
/// the task. Bounded: a poll that wakes itself every time (hyper yielding after a burst,
/// tokio's cooperative budget spent) must go back to the scheduler, or it would starve the
/// thread's other tasks.
const MAX_REPOLLS: usize = 3;

/// Set in [`POLLING`] beside a connection's address once that poll woke it. Free: a
/// [`Shared`] is aligned to more than one byte.
const WOKEN: usize = 1;

thread_local! {
    /// The connection this thread is polling now (its [`Shared`]'s address, 0 for none),
    /// with [`WOKEN`] set once it woke itself in that poll. Only ever compared, never
    /// followed; it names a connection only while that connection's poll runs (a guard
    /// puts back what it held, also when the poll panics).
    static POLLING: Cell<usize> = const { Cell::new(0) };
}

/// One per connection, made with it.
pub(super) struct ConnWaker {
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    task: AtomicWaker,
}

impl Shared {
    fn address(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let me = self.address();
        let noted = POLLING
            .try_with(|polling| {
                let now = polling.get();
                let mine = now & !WOKEN == me;
                if mine {
                    polling.set(me | WOKEN);
                }
                mine
            })
            .unwrap_or(false);
        if !noted {
            self.task.wake();
        }
    }
}

/// Restores what [`POLLING`] held before a poll, also when the poll panics: a value left
/// behind would turn this connection's later wakes on this thread into repolls no one makes.
struct PollingGuard(usize);

impl Drop for PollingGuard {
    fn drop(&mut self) {
        let _ = POLLING.try_with(|polling| polling.set(self.0));
    }
}

impl ConnWaker {
    pub(super) fn new() -> Self {
        let shared = Arc::new(Shared {
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&shared));
        Self { shared, waker }
    }

    /// Polls `poll` with the connection's waker on behalf of `cx`'s task, and again (a few
    /// times at most) while it is pending and woke the connection while it ran. A wake that
    /// comes with a ready result is dropped: the caller polls again for what it wants next,
    /// and no poll returns pending without having polled the connection.
    pub(super) fn poll<R>(
        &self,
        cx: &Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.shared.task.register(cx.waker());
        let me = self.shared.address();
        let Ok(outer) = POLLING.try_with(Cell::get) else {
            // The thread is going away: no repolls, every wake goes to the task.
            return poll(&mut Context::from_waker(&self.waker));
        };
        let _restore = PollingGuard(outer);
        let mut own = Context::from_waker(&self.waker);
        for _ in 0..MAX_REPOLLS {
            POLLING.set(me);
            let polled = poll(&mut own);
            let woken = POLLING.get() == me | WOKEN;
            if polled.is_ready() || !woken {
                return polled;
            }
        }
        // Still waking itself: let the task's scheduler decide when it runs again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Lets go of the task last registered: a connection put back in the pool must not
    /// keep a finished request's task alive.
    pub(super) fn forget_task(&self) {
        drop(self.shared.task.take());
    }
}

#[cfg(test)]
mod tests {
    use super::ConnWaker;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl CountingWaker {
        /// How many times the task was woken.
        fn woken(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<CountingWaker>, Waker) {
        let count = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&count));
        (count, waker)
    }

    #[test]
    fn a_wake_during_the_poll_is_answered_by_polling_again_not_by_the_task() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let mut polls = 0;
        let polled = conn.poll(&Context::from_waker(&task), |own| {
            polls += 1;
            if polls == 1 {
                own.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(polls)
            }
        });
        assert_eq!(polled, Poll::Ready(2));
        assert_eq!(count.woken(), 0);
    }

    /// A pending poll on `task`'s behalf that keeps the waker the connection was polled
    /// with, as a socket registration would.
    fn pending_poll_keeping_the_waker(conn: &ConnWaker, task: &Waker) -> Waker {
        let mut kept = None;
        let polled: Poll<()> = conn.poll(&Context::from_waker(task), |own| {
            kept = Some(own.waker().clone());
            Poll::Pending
        });
        assert!(polled.is_pending());
        kept.unwrap_or_else(|| Waker::noop().clone())
    }

    #[test]
    fn a_wake_with_a_ready_result_is_dropped() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let polled = conn.poll(&Context::from_waker(&task), |own| {
            own.waker().wake_by_ref();
            Poll::Ready(())
        });
        assert_eq!(polled, Poll::Ready(()));
        assert_eq!(count.woken(), 0);
    }

    #[test]
    fn a_wake_after_the_poll_wakes_the_task_once() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        assert_eq!(count.woken(), 0);
        kept.wake_by_ref();
        assert_eq!(count.woken(), 1);
        // The task's waker was handed over; a second wake before the next poll is the same
        // wake, already delivered.
        kept.wake();
        assert_eq!(count.woken(), 1);
    }

    #[test]
    fn a_poll_that_always_wakes_itself_goes_back_to_the_scheduler() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let mut polls = 0;
        let polled: Poll<()> = conn.poll(&Context::from_waker(&task), |own| {
            polls += 1;
            own.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(polls, super::MAX_REPOLLS);
        assert_eq!(count.woken(), 1);
    }

    #[test]
    fn a_task_is_woken_again_after_its_waker_was_handed_a_wake() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        kept.wake_by_ref();
        assert_eq!(count.woken(), 1);
        // The same task polls again: its waker must be registered anew, or this wake is lost.
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        kept.wake_by_ref();
        assert_eq!(count.woken(), 2);
        // A wake with nothing registered (the waker went with the last one) reaches no one.
        kept.wake_by_ref();
        assert_eq!(count.woken(), 2);
    }

    #[test]
    fn another_task_polling_is_registered_in_place_of_the_first() {
        let (first, first_task) = task();
        let (second, second_task) = task();
        let conn = ConnWaker::new();
        let _ = pending_poll_keeping_the_waker(&conn, &first_task);
        let kept = pending_poll_keeping_the_waker(&conn, &second_task);
        kept.wake();
        assert_eq!(first.woken(), 0);
        assert_eq!(second.woken(), 1);
    }

    #[test]
    fn a_wake_from_another_thread_during_the_poll_goes_to_the_task() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let mut polls = 0;
        let polled: Poll<()> = conn.poll(&Context::from_waker(&task), |own| {
            polls += 1;
            let waker = own.waker().clone();
            std::thread::spawn(move || waker.wake())
                .join()
                .expect("the waking thread ends");
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(polls, 1, "only the polling thread's own wakes are repolled");
        assert_eq!(count.woken(), 1);
    }

    #[test]
    fn a_wake_after_a_panicking_poll_still_reaches_the_task() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let mut kept = None;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Poll<()> = conn.poll(&Context::from_waker(&task), |own| {
                kept = Some(own.waker().clone());
                panic!("a poll that panics");
            });
        }));
        assert!(panicked.is_err());
        kept.expect("the poll kept the waker").wake();
        assert_eq!(count.woken(), 1);
    }

    #[test]
    fn a_forgotten_task_is_not_woken() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        conn.forget_task();
        kept.wake();
        assert_eq!(count.woken(), 0);
        assert_eq!(Arc::strong_count(&count), 2, "the task's waker was let go");
    }
}
