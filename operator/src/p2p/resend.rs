//! When a direct message is sent a second time. Pure policy over an attempt
//! the caller makes, so it is tested without a network.
//!
//! A connection can close under a message in flight: a hole punch closes the
//! relayed connection it replaces, a peer that restarted has its dead direct
//! connection closed, a ping that goes unanswered closes another. Closing is
//! right in each case, and the peer is still reachable on the connection
//! that stays, so a message that failed only because its connection closed
//! is sent once more. Each attempt is sealed anew (`attempt` builds it): a
//! copy of the same bytes would be a replay to the receiver, dropped and
//! held against us if the first copy got through. Every direct message is
//! safe to receive twice as two sealings (a bid or report names what it is
//! about, and the receiver keeps the newest).

use std::future::Future;

use super::swarm::SendError;

/// Runs `attempt`, and once more if its connection closed under it.
pub async fn resent_once<F, Fut>(mut attempt: F) -> Result<(), SendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), SendError>>,
{
    match attempt().await {
        Err(SendError::ConnectionClosed(peer)) => {
            tracing::debug!(%peer, "the connection closed under a message; sending it again");
            attempt().await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use libp2p::PeerId;

    use super::*;

    /// Runs `resent_once` over scripted outcomes; returns its result and
    /// how many attempts it made.
    fn run(script: Vec<Result<(), SendError>>) -> (Result<(), SendError>, usize) {
        let script = RefCell::new(VecDeque::from(script));
        let made = RefCell::new(0);
        let result = futures::executor::block_on(resent_once(|| {
            *made.borrow_mut() += 1;
            let next = script.borrow_mut().pop_front().expect("an outcome for every attempt");
            async move { next }
        }));
        (result, made.into_inner())
    }

    #[test]
    fn a_message_whose_connection_closed_is_sent_again() {
        let peer = PeerId::random();
        let (r, n) = run(vec![Err(SendError::ConnectionClosed(peer)), Ok(())]);
        assert!(r.is_ok());
        assert_eq!(n, 2);
    }

    #[test]
    fn it_is_sent_again_only_once() {
        let peer = PeerId::random();
        let (r, n) = run(vec![
            Err(SendError::ConnectionClosed(peer)),
            Err(SendError::ConnectionClosed(peer)),
        ]);
        assert!(matches!(r, Err(SendError::ConnectionClosed(p)) if p == peer));
        assert_eq!(n, 2);
    }

    #[test]
    fn other_failures_and_successes_are_final() {
        let peer = PeerId::random();
        for outcome in [
            Ok(()),
            Err(SendError::Busy(peer)),
            Err(SendError::Stopped),
            Err(SendError::Failed {
                peer,
                reason: "Timeout".into(),
            }),
        ] {
            let shown = format!("{outcome:?}");
            let (_, n) = run(vec![outcome]);
            assert_eq!(n, 1, "{shown} is not sent again");
        }
    }
}
