//! Activities: the side effects a workflow asks for, done outside it.
//!
//! A workflow's `decide` does no I/O. To charge a card or ask a carrier for a price, it emits an
//! event (`payment.requested`); an activity consumes that event from a queue of its own bound to
//! `{ns}.events`, does the work, and answers with an event addressed to the command that asked
//! (`payment.charged`, with `commandid` set from the request's `fromcommandid`). The workflow
//! decides on the answer like on any other event.
//!
//! - The answer's id is derived from the request's, so a request delivered twice (a crash
//!   before the ack) is answered twice with one id, and the command applies it once.
//! - A failing activity is tried again ([`ActivityError::Retry`], after 1 s, 5 s and 30 s);
//!   one that cannot succeed ([`ActivityError::Fail`]), or keeps failing, becomes a dead letter
//!   with its reason, for ops to replay or discard like any other.
//!
//! ```no_run
//! use cmdflow::activity::{Activity, ActivityError, Reply};
//! use serde_json::json;
//!
//! let quote = Activity::new("carrier-quote", &["shipment.quote_requested"], |event| async move {
//!     let weight = event.data.get("kg").and_then(|v| v.as_f64())
//!         .ok_or_else(|| ActivityError::Fail("kg is required".into()))?;
//!     // … call the carrier here …
//!     Ok(Reply::new("shipment.quoted", json!({ "price": 4.5 + weight * 0.8 })))
//! });
//! # let _ = quote;
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cmdflow_shared::Event;
use cmdflow_shared::bus::{self, Bus, BusError};
use cmdflow_shared::contract::FROM_COMMAND;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why an activity did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivityError {
    /// Trouble that may pass (a timeout, a 503): the request is tried again.
    #[error("{0}")]
    Retry(String),
    /// The request can never succeed: it becomes a dead letter with this reason.
    #[error("{0}")]
    Fail(String),
}

/// An activity's answer: an event of `ty` with `data`, addressed to the command that asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    ty: String,
    data: Map<String, Value>,
}

impl Reply {
    /// An answer of type `ty` (`domain.past_tense_verb`) carrying `data` (a JSON object; any
    /// other value is carried as `{"value": …}`).
    pub fn new(ty: &str, data: Value) -> Self {
        let data = match data {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        Self {
            ty: ty.to_owned(),
            data,
        }
    }
}

type Work = dyn Fn(Event) -> Pin<Box<dyn Future<Output = Result<Reply, ActivityError>> + Send>>
    + Send
    + Sync;

/// A named consumer of some event types that answers each with an event.
#[derive(Clone)]
pub struct Activity {
    name: String,
    event_types: Vec<String>,
    work: Arc<Work>,
    concurrency: u16,
    retries: Vec<Duration>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("name", &self.name)
            .field("event_types", &self.event_types)
            .finish_non_exhaustive()
    }
}

impl Activity {
    /// An activity called `name` (its queue is `{ns}.activity.{name}`) that answers events of
    /// `event_types` (routing keys: `prefix.*` and `#` patterns work too) with `work`.
    pub fn new<F, Fut>(name: &str, event_types: &[&str], work: F) -> Self
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, ActivityError>> + Send + 'static,
    {
        Self {
            name: name.to_owned(),
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
            work: Arc::new(move |event| Box::pin(work(event))),
            concurrency: 8,
            retries: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
        }
    }

    /// How many requests it works on at once (default 8).
    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The delays between tries after [`ActivityError::Retry`] (default 1 s, 5 s, 30 s); after
    /// the last, the request is a dead letter.
    pub fn retries(mut self, delays: &[Duration]) -> Self {
        self.retries = delays.to_vec();
        self
    }

    /// The activity's name: its queue is `{ns}.activity.{name}`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consumes its queue until `shutdown` fires, reconnecting to the broker as needed.
    pub async fn run_until_stopped(self, bus: Arc<Bus>, shutdown: CancellationToken) {
        let queue = bus.topology().activity_queue(&self.name);
        loop {
            match self.consume(&bus, &queue, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, queue.name = %queue, "An activity lost the broker; reconnecting.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    async fn consume(
        &self,
        bus: &Arc<Bus>,
        queue: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        bus.declare_subscriber(queue, &self.event_types).await?;
        let channel = bus.channel().await?;
        channel
            .basic_qos(self.concurrency, BasicQosOptions::default())
            .await?;
        let tag = format!("cmdflow-activity-{}-{}", self.name, uuid::Uuid::new_v4());
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue.name = %queue, "Activity consuming.");
        let tracker = TaskTracker::new();
        let result = loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => break Err(BusError::from(e)),
                None => {
                    break Err(BusError::Connect {
                        url: bus.url(),
                        reason: "the activity's consumer was cancelled".into(),
                    });
                }
            };
            let (activity, bus) = (self.clone(), Arc::clone(bus));
            tracker.spawn(async move { activity.handle(&bus, delivery).await });
        };
        tracker.close();
        tracker.wait().await;
        drop(channel.close(200, "activity stopping".into()).await);
        result
    }

    /// Works on one request: answers it, or dead-letters it with the reason; then acks.
    async fn handle(&self, bus: &Bus, delivery: Delivery) {
        let outcome = match Event::parse(&delivery.data) {
            Err(e) => Err(("invalid_event", format!("invalid event: {e}"))),
            Ok(event) => self.answer(bus, event).await,
        };
        let settled = match outcome {
            Ok(()) => Ok(()),
            Err((class, reason)) => {
                tracing::error!(activity = %self.name, error.class = class, reason, "An activity request became a dead letter.");
                self.dead_letter(bus, &delivery, class, &reason).await
            }
        };
        let acked = match settled {
            Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
            Err(e) => {
                tracing::warn!(error = %e, "Could not answer or dead-letter an activity request; the broker will redeliver it.");
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        };
        if let Err(e) = acked {
            tracing::warn!(error = %e, "Could not settle an activity request; it will come again and be answered with the same id.");
        }
    }

    /// Runs the work (with its retries) and publishes the answer.
    async fn answer(&self, bus: &Bus, event: Event) -> Result<(), (&'static str, String)> {
        let mut delays = self.retries.iter();
        let reply = loop {
            match (self.work)(event.clone()).await {
                Ok(reply) => break reply,
                Err(ActivityError::Fail(reason)) => return Err(("activity_failed", reason)),
                Err(ActivityError::Retry(reason)) => match delays.next() {
                    Some(delay) => {
                        tracing::warn!(activity = %self.name, error = %reason, delay = ?delay, "An activity will try again.");
                        tokio::time::sleep(*delay).await;
                    }
                    None => {
                        return Err((
                            "retries_exhausted",
                            format!("gave up after {} tries: {reason}", self.retries.len() + 1),
                        ));
                    }
                },
            }
        };
        let answer = self.reply_event(&event, reply)?;
        let body = answer.to_bytes();
        let mut last = None;
        // Publishing fails only when the broker does: a few quick tries, then the request is
        // left to the broker to redeliver (nack), and answered again with the same id.
        for _ in 0..3 {
            match bus
                .publish_event(
                    &answer.ty,
                    &answer.id,
                    &bus::route_key(&answer),
                    &body,
                    bus::event_headers(&answer),
                )
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err((
            "broker",
            format!(
                "could not publish the answer: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            ),
        ))
    }

    /// The answer as an event: addressed to the command that asked (or, for a request no
    /// command sent, a broadcast correlated like the request), with an id derived from the
    /// request's.
    fn reply_event(&self, request: &Event, reply: Reply) -> Result<Event, (&'static str, String)> {
        let mut answer = Event::new(&format!("activity/{}", self.name), &reply.ty, reply.data);
        let seed = format!(
            "{}\n{}\n{}\n{}",
            self.name, request.source, request.id, reply.ty
        );
        answer.id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes()).to_string();
        answer.commandid = request
            .extensions
            .get(FROM_COMMAND)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok());
        answer.subject = request.subject.clone();
        answer.correlationid = request.correlationid.clone();
        answer.causationid = Some(request.id.clone());
        if let Some(tp) = request.extensions.get(cmdflow_shared::trace::TRACEPARENT) {
            answer.extensions.insert(
                cmdflow_shared::trace::TRACEPARENT.to_owned(),
                Value::String(cmdflow_shared::trace::child_of(tp.as_str())),
            );
        }
        // What the answer would be refused for at the door is refused here, with the reason.
        Event::parse(&answer.to_bytes())
            .map(|_| answer)
            .map_err(|e| {
                (
                    "invalid_answer",
                    format!("the activity's answer is invalid: {e}"),
                )
            })
    }

    async fn dead_letter(
        &self,
        bus: &Bus,
        delivery: &Delivery,
        class: &str,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let reason = cmdflow_shared::contract::clip_to(reason, 1000);
        headers.insert(bus::HEADER_REASON.into(), bus::string(&reason));
        headers.insert(bus::HEADER_ERROR_CLASS.into(), bus::string(class));
        headers.insert(
            bus::HEADER_DEAD_ID.into(),
            bus::string(&uuid::Uuid::now_v7().to_string()),
        );
        headers.insert(
            bus::HEADER_ROUTING_KEY.into(),
            bus::string(delivery.routing_key.as_str()),
        );
        let props = delivery.properties.clone().with_headers(headers);
        bus.publish(
            &bus.topology().dead_letter_exchange(),
            delivery.routing_key.as_str(),
            &delivery.data,
            props,
        )
        .await
    }
}
