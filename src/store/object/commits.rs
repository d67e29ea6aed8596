//! One server's own commits to one name, one at a time: of two uploads racing to a name without --force, exactly one wins.
//!
//! An object store without conditional writes (Garage ignores
//! If-None-Match) lets two completes of the same key both succeed, the
//! later one silently replacing the earlier. Within one server that race is
//! closed here: commits to a key take turns, and a turn learns whether
//! another commit of this server finished since the upload checked its
//! name. Between servers the window is what the README states.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

/// How many keys are remembered before idle ones are forgotten.
const REMEMBERED: usize = 1024;

/// How long a finished commit is remembered: longer than any upload trusts
/// an earlier check of its name (see `upload::RECHECK_AFTER`).
const REMEMBER_FOR: Duration = Duration::from_secs(10);

/// The commits of this server, by key.
#[derive(Debug, Default)]
pub(super) struct Commits {
    keys: Mutex<HashMap<String, KeyState>>,
}

#[derive(Debug, Default)]
struct KeyState {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// When a commit to this key last succeeded.
    last: Option<Instant>,
}

/// The right to commit to one key until dropped.
pub(super) struct Turn<'a> {
    commits: &'a Commits,
    key: String,
    /// Another commit of this server to the key succeeded after the
    /// instant given to [`Commits::turn`].
    pub(super) committed_since: bool,
    _held: OwnedMutexGuard<()>,
}

impl Commits {
    /// Waits until no other commit of this server to `key` is under way.
    pub(super) async fn turn(&self, key: &str, since: Instant) -> Turn<'_> {
        let turn = {
            let mut keys = self.keys.lock().expect("commit map poisoned");
            if keys.len() >= REMEMBERED {
                keys.retain(|_, s| {
                    Arc::strong_count(&s.turn) > 1
                        || s.last.is_some_and(|t| t.elapsed() < REMEMBER_FOR)
                });
            }
            keys.entry(key.to_owned()).or_default().turn.clone()
        };
        let held = turn.lock_owned().await;
        let last = self
            .keys
            .lock()
            .expect("commit map poisoned")
            .get(key)
            .and_then(|s| s.last);
        Turn {
            commits: self,
            key: key.to_owned(),
            committed_since: last.is_some_and(|t| t > since),
            _held: held,
        }
    }
}

impl Turn<'_> {
    /// Records that this commit succeeded, then ends the turn.
    pub(super) fn succeeded(self) {
        let mut keys = self.commits.keys.lock().expect("commit map poisoned");
        if let Some(s) = keys.get_mut(&self.key) {
            s.last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_on_one_key_take_turns_and_see_each_other() {
        let commits = Arc::new(Commits::default());
        let checked = Instant::now();
        let first = commits.turn("a", checked).await;
        assert!(!first.committed_since);
        // Another key is not held up.
        let other = commits.turn("b", checked).await;
        drop(other);
        // The same key waits for the first turn.
        let c = commits.clone();
        let second = tokio::spawn(async move { c.turn("a", checked).await.committed_since });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second turn waits");
        first.succeeded();
        assert!(second.await.unwrap(), "and learns the first succeeded");
        // A check made after that commit is not affected by it.
        let later = commits.turn("a", Instant::now()).await;
        assert!(!later.committed_since);
    }

    #[tokio::test]
    async fn a_failed_commit_is_not_remembered() {
        let commits = Commits::default();
        let checked = Instant::now();
        drop(commits.turn("a", checked).await);
        assert!(!commits.turn("a", checked).await.committed_since);
    }

    #[tokio::test]
    async fn idle_keys_are_forgotten_and_held_ones_kept() {
        let commits = Commits::default();
        let checked = Instant::now();
        let held = commits.turn("held", checked).await;
        for i in 0..REMEMBERED + 10 {
            drop(commits.turn(&format!("k{i}"), checked).await);
        }
        let keys = commits.keys.lock().unwrap();
        assert!(keys.len() <= REMEMBERED, "{}", keys.len());
        assert!(keys.contains_key("held"));
        drop(keys);
        drop(held);
    }
}
