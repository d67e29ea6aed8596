//! Work an object root does after the answer it belongs to has gone (an upload's bookkeeping, leases given back), counted so that a server shutting down can wait for it.

use std::future::Future;

use tokio::sync::watch;

/// The tasks running on after their request was answered.
#[derive(Debug)]
pub(super) struct Background {
    running: watch::Sender<usize>,
}

impl Default for Background {
    fn default() -> Self {
        Self {
            running: watch::Sender::new(0),
        }
    }
}

impl Background {
    /// Runs `work` on its own, counted until it ends. Outside a runtime
    /// (a value dropped after its runtime) it is not run: what it would
    /// have cleaned up lapses by itself or is swept.
    pub(super) fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.running.send_modify(|n| *n += 1);
        let done = Done(self.running.clone());
        runtime.spawn(async move {
            let _done = done;
            work.await;
        });
    }

    /// Waits until none runs.
    pub(super) async fn idle(&self) {
        let mut running = self.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
    }
}

/// Uncounts a task when it ends, or when it is dropped unfinished (its
/// runtime shut down).
struct Done(watch::Sender<usize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_task_and_counts_one_that_panicked() {
        let background = Background::default();
        background.idle().await; // none yet: at once
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        background.spawn(async move {
            let _ = rx.await;
        });
        background.spawn(async { panic!("a task that fails still ends") });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), background.idle())
                .await
                .is_err(),
            "a task still runs"
        );
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), background.idle())
            .await
            .expect("both tasks ended");
    }
}
