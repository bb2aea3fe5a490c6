//! One call per idempotency key at a time. The stored response answers a
//! retry that comes after the first call ended; this answers the duplicate
//! that arrives while the first still runs (a client retrying after its own
//! timeout): it waits for the first call and gets the first call's answer,
//! never a second run of the change.
//!
//! The first call's outcome is shared whatever it is: its response, or its
//! error status. Errors are not stored (the change did not happen, so a
//! later retry with the key is a new attempt), but a duplicate that waited
//! on a failed call gets that call's error, not a run of its own: it was
//! sent as the same call, and it must not race a client's retry logic.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tonic::Status;

/// The outcome of a call as its duplicates receive it: the encoded
/// response, or the status.
pub type Shared = Result<Vec<u8>, Status>;

type Slot = watch::Receiver<Option<Shared>>;

/// The calls under way, by (scope, key), with their request's hash.
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<(String, String), (String, Slot)>>,
}

/// What [`Flights::join`] made of a call.
pub enum Joined {
    /// No call with this key runs: this one runs, and publishes its outcome
    /// through the [`Leader`].
    Lead(Leader),
    /// A call with this key and the same request runs: wait on it.
    Follow(Slot),
    /// A call with this key and another request runs.
    Conflict,
}

/// The right (and duty) to run the call and publish its outcome. Dropped
/// unpublished (its task panicked), it tells followers so and frees the key.
pub struct Leader {
    flights: Arc<Flights>,
    id: (String, String),
    tx: watch::Sender<Option<Shared>>,
}

impl Flights {
    pub fn join(self: &Arc<Self>, scope: &str, key: &str, request_hash: &str) -> Joined {
        let id = (scope.to_owned(), key.to_owned());
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((hash, slot)) = running.get(&id) {
            return if hash == request_hash {
                Joined::Follow(slot.clone())
            } else {
                Joined::Conflict
            };
        }
        let (tx, rx) = watch::channel(None);
        running.insert(id.clone(), (request_hash.to_owned(), rx));
        Joined::Lead(Leader {
            flights: self.clone(),
            id,
            tx,
        })
    }
}

impl Leader {
    /// Publishes the outcome to every follower and frees the key. The
    /// outcome is stored (if it is a response) before this runs, so a call
    /// that comes after finds the stored response.
    pub fn publish(self, outcome: Shared) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            self.tx
                .send_replace(Some(Err(super::status::leader_lost())));
        }
        self.flights
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Waits for the leader's outcome.
pub async fn wait(mut slot: Slot) -> Shared {
    // The sender publishes before it goes (see Leader's drop), so a closed
    // channel still holds the outcome.
    let _ = slot.wait_for(Option::is_some).await;
    let outcome = slot.borrow().clone();
    outcome.unwrap_or_else(|| Err(super::status::leader_lost()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_duplicate_follows_and_gets_the_leaders_outcome() {
        let flights = Arc::new(Flights::default());
        let Joined::Lead(leader) = flights.join("LinkStage\nlocal", "k", "h1") else {
            panic!("the first call leads");
        };
        let Joined::Follow(slot) = flights.join("LinkStage\nlocal", "k", "h1") else {
            panic!("a duplicate follows");
        };
        assert!(matches!(
            flights.join("LinkStage\nlocal", "k", "h2"),
            Joined::Conflict
        ));
        // Another key, or another caller, is another call.
        assert!(matches!(
            flights.join("LinkStage\nother", "k", "h1"),
            Joined::Lead(_)
        ));
        let waiter = tokio::spawn(wait(slot));
        leader.publish(Ok(b"answer".to_vec()));
        assert_eq!(waiter.await.unwrap().unwrap(), b"answer");
        // Published: the key is free again (the store answers from now on).
        assert!(matches!(
            flights.join("LinkStage\nlocal", "k", "h1"),
            Joined::Lead(_)
        ));
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_answer_releases_its_followers() {
        let flights = Arc::new(Flights::default());
        let Joined::Lead(leader) = flights.join("s", "k", "h") else {
            panic!("the first call leads");
        };
        let Joined::Follow(slot) = flights.join("s", "k", "h") else {
            panic!("a duplicate follows");
        };
        drop(leader);
        let status = wait(slot).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Aborted);
    }
}
