//! When a direct message is sent again. Pure policy over an attempt the
//! caller makes, so it is tested without a network.
//!
//! A connection can close under a message in flight: of two circuits the
//! members dialled to each other at once, both ends close the one the
//! bigger peer id dialled; a hole punch closes the relayed connection it
//! replaces; a peer that restarted has its dead direct connection closed; a
//! ping that goes unanswered closes another. Closing is right in each case,
//! and the peer is still reachable on the connection that stays, so a
//! message that failed only because its connection closed is sent again.
//! These closes can follow one another: a message sent as two members
//! first dial each other can go out on the crossed circuit (closed), then
//! on the kept circuit just before the punch closes that too. One resend
//! was not enough for this (seen in CI: a burst of 300 over TCP where every
//! message and its one resend failed as closed), so a message is sent
//! again up to [`RESENDS`] times, one for each close that can replace the
//! connection under it. A peer that is really gone does not take them all:
//! with no connection left, the next attempt fails to dial, which is final.
//!
//! Each attempt is sealed anew (`attempt` builds it): a copy of the same
//! bytes would be a replay to the receiver, dropped and held against us if
//! the first copy got through. Every direct message is safe to receive
//! twice as two sealings (a bid or report names what it is about, and the
//! receiver keeps the newest).

use std::future::Future;

use super::swarm::SendError;

/// How many times a message whose connection closed under it is sent
/// again: one for each replacement that can follow another (crossed
/// circuit, hole punch, restarted peer's dead connection).
pub const RESENDS: usize = 3;

/// Runs `attempt`, and again, up to [`RESENDS`] times, while its
/// connection closes under it.
pub async fn resent_on_close<F, Fut>(mut attempt: F) -> Result<(), SendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), SendError>>,
{
    let mut outcome = attempt().await;
    for resend in 1..=RESENDS {
        match outcome {
            Err(SendError::ConnectionClosed(peer)) => {
                tracing::debug!(%peer, resend, "the connection closed under a message; sending it again");
                outcome = attempt().await;
            }
            _ => break,
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use libp2p::PeerId;

    use super::*;

    /// Runs `resent_on_close` over scripted outcomes; returns its result and
    /// how many attempts it made.
    fn run(script: Vec<Result<(), SendError>>) -> (Result<(), SendError>, usize) {
        let script = RefCell::new(VecDeque::from(script));
        let made = RefCell::new(0);
        let result = futures::executor::block_on(resent_on_close(|| {
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
    fn it_is_sent_again_past_closes_that_follow_one_another() {
        // Crossed circuit closed, then the kept circuit closed by the punch.
        let peer = PeerId::random();
        let (r, n) = run(vec![
            Err(SendError::ConnectionClosed(peer)),
            Err(SendError::ConnectionClosed(peer)),
            Ok(()),
        ]);
        assert!(r.is_ok());
        assert_eq!(n, 3);
    }

    #[test]
    fn it_is_sent_again_at_most_resends_times() {
        let peer = PeerId::random();
        let (r, n) = run((0..=RESENDS).map(|_| Err(SendError::ConnectionClosed(peer))).collect());
        assert!(matches!(r, Err(SendError::ConnectionClosed(p)) if p == peer));
        assert_eq!(n, RESENDS + 1);
    }

    #[test]
    fn a_resend_that_fails_otherwise_is_final() {
        // The peer is gone: no connection is left to send on.
        let peer = PeerId::random();
        let (r, n) = run(vec![
            Err(SendError::ConnectionClosed(peer)),
            Err(SendError::Failed {
                peer,
                reason: "DialFailure".into(),
            }),
        ]);
        assert!(matches!(r, Err(SendError::Failed { .. })));
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
