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
//! is polling the connection is answered by polling it again at once (when the poll was
//! pending); one that comes at any other time (the socket is readable, a timer fired, another
//! thread) wakes the request's task as before.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Not being polled: a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled: a wake is noted, and answered by the poller.
const POLLING: u8 = 1;
/// Being polled, and woken since the poll began.
const WOKEN: u8 = 2;

/// How many times one poll polls again for wakes it caused itself before it hands the wake to
/// the task. Bounded: a poll that wakes itself every time (hyper yielding after a burst,
/// tokio's cooperative budget spent) must go back to the scheduler, or it would starve the
/// thread's other tasks.
const MAX_REPOLLS: usize = 3;

/// One per connection, made with it.
pub(super) struct ConnWaker {
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    task: AtomicWaker,
    state: AtomicU8,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl ConnWaker {
    pub(super) fn new() -> Self {
        let shared = Arc::new(Shared {
            task: AtomicWaker::new(),
            state: AtomicU8::new(IDLE),
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
        let mut own = Context::from_waker(&self.waker);
        for _ in 0..MAX_REPOLLS {
            self.shared.state.store(POLLING, Ordering::Release);
            let polled = poll(&mut own);
            let woken = self.shared.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
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
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
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
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_wake_after_the_poll_wakes_the_task_once() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        kept.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // The task's waker was handed over; a second wake before the next poll is the same
        // wake, already delivered.
        kept.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
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
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_forgotten_task_is_not_woken() {
        let (count, task) = task();
        let conn = ConnWaker::new();
        let kept = pending_poll_keeping_the_waker(&conn, &task);
        conn.forget_task();
        kept.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert_eq!(Arc::strong_count(&count), 2, "the task's waker was let go");
    }
}
