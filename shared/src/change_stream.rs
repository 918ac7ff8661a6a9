//! Following a MongoDB change stream without missing a change: open it, hand each change to a
//! [`Follower`], and after an error (MongoDB restarted, failed over, a network blip) open it
//! again after the last change seen, backing off with the one jittered policy
//! ([`Backoff`]). Where it cannot resume (the oplog moved on past that change) it says so and
//! starts afresh. The follower is told each time the stream goes up or down, for its gauges
//! and logs. Both services follow their streams through this one loop.

use std::{future::Future, time::Duration};

use bson::{Document, Timestamp};
use futures::{FutureExt, StreamExt};
use mongodb::{
    change_stream::event::{ChangeStreamEvent, ResumeToken},
    error::{Error, ErrorKind},
    options::FullDocumentType,
    Collection, Database,
};
use tokio::time::Instant;

use crate::backoff::{random_unit, Backoff};

/// MongoDB's codes for a change stream that cannot resume from its token.
const CANNOT_RESUME: [i32; 3] = [
    260, // InvalidResumeToken
    280, // ChangeStreamFatalError
    286, // ChangeStreamHistoryLost
];

/// What a change stream watches.
#[derive(Debug, Clone)]
pub enum Source {
    Database(Database),
    Collection(Collection<Document>),
}

/// A change stream to follow.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Which changes (a `$match` stage, say).
    pub pipeline: Vec<Document>,
    /// Whether updates carry the document as it is now.
    pub full_document: Option<FullDocumentType>,
    /// Changes per batch from the server: catching up never holds more at once.
    pub batch_size: Option<u32>,
    /// Where the first stream starts (to read back a window of past changes); later ones
    /// resume after the last change seen.
    pub start_at: Option<Timestamp>,
    /// Delays between attempts after failures in a row; back to the first delay once the
    /// stream delivered a change or stayed up for `backoff.cap`.
    pub backoff: Backoff,
}

/// Where the stream stands, as told to the follower.
#[derive(Debug)]
pub enum State<'a> {
    /// Open (again). `resumed`: after the last change seen, so nothing was missed.
    Up { resumed: bool },
    /// It failed or ended; it is opened again after `retry_in`.
    Down {
        error: &'a Error,
        /// Failures in a row, this one included.
        failures: u32,
        retry_in: Duration,
    },
    /// It cannot resume after the last change seen (the oplog moved on): changes were missed,
    /// and the next stream starts from now.
    HistoryLost {
        error: &'a Error,
        retry_in: Duration,
    },
}

/// What follows a change stream.
pub trait Follower: Send {
    /// The stream went up or down.
    fn state(&mut self, state: State<'_>);
    /// One change, in order. The stream waits for it (a follower slows reading down this way).
    fn change(&mut self, change: ChangeStreamEvent<Document>) -> impl Future<Output = ()> + Send;
    /// Every change received so far has been handed over and the next must come from the
    /// server: a follower that holds changes back to handle several at once finishes them
    /// here. (The server's next batch is asked for meanwhile.)
    fn idle(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Whether `error` means the stream cannot resume from its token.
pub fn cannot_resume(error: &Error) -> bool {
    matches!(*error.kind, ErrorKind::Command(ref c) if CANNOT_RESUME.contains(&c.code))
}

/// Follows `spec` on `source` for ever; stop it by dropping the future.
pub async fn follow<F: Follower>(source: &Source, mut spec: Spec, follower: &mut F) {
    let mut resume: Option<ResumeToken> = None;
    let mut failures: u32 = 0;
    loop {
        let opened = open(source, &spec, resume.clone()).await;
        let (error, healthy) = match opened {
            Ok(mut stream) => {
                let up_at = Instant::now();
                follower.state(State::Up {
                    resumed: resume.is_some(),
                });
                // Later streams resume after the last change instead.
                spec.start_at = None;
                let mut delivered = false;
                let error = loop {
                    // What the last batch brought comes without waiting; when the next
                    // must come from the server, the follower hears so first.
                    let next = match stream.next().now_or_never() {
                        Some(next) => next,
                        None => {
                            follower.idle().await;
                            stream.next().await
                        }
                    };
                    match next {
                        Some(Ok(change)) => {
                            delivered = true;
                            // The stream's own token: past this change, or past a quiet
                            // stretch the server reported (post-batch token).
                            let token = stream.resume_token().unwrap_or_else(|| change.id.clone());
                            follower.change(change).await;
                            resume = Some(token);
                        }
                        Some(Err(e)) => {
                            resume = stream.resume_token().or(resume);
                            break e;
                        }
                        None => break Error::custom("the change stream ended"),
                    }
                };
                // What came before the failure is handed over before it is told.
                follower.idle().await;
                (error, delivered || up_at.elapsed() >= spec.backoff.cap)
            }
            Err(e) => (e, false),
        };
        failures = if healthy { 1 } else { failures + 1 };
        let retry_in = spec.backoff.delay(failures, random_unit());
        if cannot_resume(&error) {
            resume = None;
            spec.start_at = None;
            follower.state(State::HistoryLost {
                error: &error,
                retry_in,
            });
        } else {
            follower.state(State::Down {
                error: &error,
                failures,
                retry_in,
            });
        }
        tokio::time::sleep(retry_in).await;
    }
}

async fn open(
    source: &Source,
    spec: &Spec,
    resume: Option<ResumeToken>,
) -> mongodb::error::Result<mongodb::change_stream::ChangeStream<ChangeStreamEvent<Document>>> {
    let mut watch = match source {
        Source::Database(db) => db.watch(),
        Source::Collection(coll) => coll.watch(),
    }
    .pipeline(spec.pipeline.clone());
    if let Some(f) = &spec.full_document {
        watch = watch.full_document(f.clone());
    }
    if let Some(n) = spec.batch_size {
        watch = watch.batch_size(n);
    }
    match (resume, spec.start_at) {
        (Some(token), _) => watch.resume_after(token).await,
        (None, Some(at)) => watch.start_at_operation_time(at).await,
        (None, None) => watch.await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records what it was told.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<(u32, Duration)>>>);

    impl Follower for Recorder {
        fn state(&mut self, state: State<'_>) {
            if let State::Down {
                failures, retry_in, ..
            } = state
            {
                self.0.lock().unwrap().push((failures, retry_in));
            }
        }

        async fn change(&mut self, _: ChangeStreamEvent<Document>) {}
    }

    /// A server that is not there: every open fails; the delays grow as the policy says and
    /// stay under its cap.
    #[tokio::test]
    async fn failures_back_off_with_the_one_policy() {
        let client = mongodb::Client::with_uri_str(
            "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=10&directConnection=true",
        )
        .await
        .expect("client");
        let source = Source::Database(client.database("nowhere"));
        let spec = Spec {
            pipeline: Vec::new(),
            full_document: None,
            batch_size: None,
            start_at: None,
            backoff: Backoff {
                base: Duration::from_millis(20),
                cap: Duration::from_millis(80),
            },
        };
        let rec = Recorder::default();
        let mut follower = rec.clone();
        let four = async {
            while rec.0.lock().unwrap().len() < 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            _ = follow(&source, spec, &mut follower) => unreachable!("follows for ever"),
            _ = tokio::time::timeout(Duration::from_secs(30), four) => {}
        }
        let seen = rec.0.lock().unwrap().clone();
        assert!(seen.len() >= 4, "{seen:?}");
        for (i, (failures, retry_in)) in seen.iter().take(4).enumerate() {
            assert_eq!(*failures as usize, i + 1, "failures in a row");
            let step = Duration::from_millis((20u64 << i).min(80));
            assert!(
                *retry_in >= step / 2 && *retry_in <= step,
                "{retry_in:?} within half a step of {step:?}"
            );
        }
    }

    #[test]
    fn only_the_history_codes_mean_it_cannot_resume() {
        let command = |code: i32| {
            Error::from(ErrorKind::Command(
                bson::from_document(bson::doc! { "code": code, "codeName": "X", "errmsg": "x" })
                    .expect("command error"),
            ))
        };
        assert!(cannot_resume(&command(286)));
        assert!(cannot_resume(&command(260)));
        assert!(!cannot_resume(&command(6)));
        assert!(!cannot_resume(&Error::custom("the change stream ended")));
    }
}
