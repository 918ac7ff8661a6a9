//! Which messages of a CML server's event stream (`/ws/ui`) call for a sync of a lab: pure.
//!
//! A message is read for its envelope only (`event_type`, `event`, `element_type`, `lab_id`);
//! its `data` is skipped unread, whatever its size. Lab events and the creation or deletion of
//! a lab's nodes, links or interfaces change what a record keeps (its fields, its counts);
//! element modifications, element state changes and the periodic stats do not. A message
//! whose `event_type` names users or groups (CML 2.9+'s schema defines them; their shape is
//! not known) changes who may see the labs: the server's users and groups are read again.

use std::fmt;

use cml_client::payload::clip;
use serde::Deserialize;
use shared::record::plausible_lab_id;

/// The kinds of message a stream carries, a closed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    LabEvent,
    LabElementEvent,
    StateChange,
    SystemStats,
    LabStats,
    /// An `event_type` naming users or groups (`user_event`, `group_event`, …).
    Access,
    /// A JSON object of another `event_type` (a newer server's, `system_event`, `ping`, …).
    Other,
    /// Not a JSON object with an `event_type`.
    Malformed,
}

impl MessageKind {
    pub const ALL: [MessageKind; 8] = [
        MessageKind::LabEvent,
        MessageKind::LabElementEvent,
        MessageKind::StateChange,
        MessageKind::SystemStats,
        MessageKind::LabStats,
        MessageKind::Access,
        MessageKind::Other,
        MessageKind::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::LabEvent => "lab_event",
            MessageKind::LabElementEvent => "lab_element_event",
            MessageKind::StateChange => "state_change",
            MessageKind::SystemStats => "system_stats",
            MessageKind::LabStats => "lab_stats",
            MessageKind::Access => "access",
            MessageKind::Other => "other",
            MessageKind::Malformed => "malformed",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one message means for the worker's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: MessageKind,
    /// The lab to re-read, when the message changed something its record keeps.
    pub sync: Option<String>,
    /// The message says a lab or a node changed state (CML's sign of activity on the worker).
    pub activity: bool,
    /// The message says users or groups changed: who may see the labs is read again.
    pub access: bool,
    /// The lab id it named, refused: not a plausible CML lab id (clipped, for the log).
    pub refused: Option<String>,
}

impl Verdict {
    fn ignore(kind: MessageKind) -> Self {
        Self {
            kind,
            sync: None,
            activity: false,
            access: false,
            refused: None,
        }
    }
}

/// The envelope of a message; `data` and every other key are skipped unread (serde skips
/// unknown keys without building them).
#[derive(Debug, Deserialize)]
struct Envelope {
    event_type: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    element_type: Option<String>,
    #[serde(default)]
    lab_id: Option<String>,
}

/// What `text`, one text message of the stream, means for the worker's records.
pub fn classify(text: &str) -> Verdict {
    let Ok(envelope) = serde_json::from_str::<Envelope>(text) else {
        return Verdict::ignore(MessageKind::Malformed);
    };
    let Some(event_type) = envelope.event_type else {
        return Verdict::ignore(MessageKind::Malformed);
    };
    let (lab, refused) = match envelope.lab_id.filter(|id| !id.is_empty()) {
        Some(id) if plausible_lab_id(&id) => (Some(id), None),
        Some(id) => (None, Some(clip(&id))),
        None => (None, None),
    };
    let event = envelope.event.unwrap_or_default().to_ascii_lowercase();
    let element = envelope
        .element_type
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut verdict = match event_type.to_ascii_lowercase().as_str() {
        "lab_event" => Verdict {
            kind: MessageKind::LabEvent,
            activity: event == "state",
            // Created, modified (title, description, notes, owner), deleted, state: all kept.
            sync: lab,
            access: false,
            refused: None,
        },
        "lab_element_event" => {
            let counted = matches!(element.as_str(), "node" | "link" | "interface");
            let changes_count = matches!(event.as_str(), "created" | "deleted");
            Verdict {
                kind: MessageKind::LabElementEvent,
                activity: false,
                sync: (counted && changes_count).then_some(lab).flatten(),
                access: false,
                refused: None,
            }
        }
        "state_change" => Verdict {
            kind: MessageKind::StateChange,
            sync: None,
            activity: true,
            access: false,
            refused: None,
        },
        "system_stats" => Verdict::ignore(MessageKind::SystemStats),
        "lab_stats" => Verdict::ignore(MessageKind::LabStats),
        other if names_users_or_groups(other) => Verdict {
            access: true,
            ..Verdict::ignore(MessageKind::Access)
        },
        _ => Verdict::ignore(MessageKind::Other),
    };
    verdict.refused = refused;
    verdict
}

/// Whether an `event_type` names users or groups (`user_event`, `group_event`, `users`,
/// `group_membership_event`, …), as CML 2.9+'s schema defines such events.
fn names_users_or_groups(event_type: &str) -> bool {
    event_type
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| matches!(word, "user" | "users" | "group" | "groups" | "membership"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    fn message(event_type: &str, event: &str, element_type: &str) -> String {
        json!({
            "event_type": event_type, "event": event, "element_type": element_type,
            "lab_id": "lab-1", "element_id": "n0", "data": {"state": "BOOTED"},
        })
        .to_string()
    }

    fn syncs(text: &str) -> bool {
        classify(text).sync.as_deref() == Some("lab-1")
    }

    /// A lab id that is not a plausible CML lab id (`.` and `..` would walk the API's path)
    /// syncs nothing and is told as refused, in any kind of message.
    #[test]
    fn implausible_lab_ids_are_refused_and_sync_nothing() {
        for id in ["..", ".", "../users", "a b", &"x".repeat(65)] {
            for (event_type, element) in [("lab_event", ""), ("lab_element_event", "node")] {
                let text = json!({
                    "event_type": event_type, "event": "created", "element_type": element,
                    "lab_id": id,
                })
                .to_string();
                let v = classify(&text);
                assert_eq!(v.sync, None, "{text}");
                assert_eq!(v.refused.as_deref(), Some(clip(id).as_str()), "{text}");
            }
        }
        let fine = classify(&message("lab_event", "modified", ""));
        assert_eq!(fine.refused, None);
        let empty = classify(r#"{"event_type":"system_stats","lab_id":""}"#);
        assert_eq!(empty.refused, None);
    }

    #[test]
    fn user_and_group_events_read_who_may_see_the_labs_again() {
        for event_type in [
            "user_event",
            "group_event",
            "USER_EVENT",
            "group_membership_event",
            "users",
        ] {
            let v = classify(&message(event_type, "modified", "user"));
            assert_eq!(v.kind, MessageKind::Access, "{event_type}");
            assert!(v.access && v.sync.is_none(), "{event_type}");
        }
        for event_type in [
            "lab_event",
            "system_event",
            "usergroupish",
            "superuser_stats",
        ] {
            assert!(
                !classify(&message(event_type, "modified", "")).access,
                "{event_type}"
            );
        }
    }

    #[test]
    fn lab_events_and_counted_elements_coming_or_going_sync_the_lab() {
        for event in ["created", "modified", "deleted", "state"] {
            assert!(syncs(&message("lab_event", event, "lab")), "lab {event}");
        }
        for element in ["node", "link", "interface"] {
            for event in ["created", "deleted"] {
                assert!(
                    syncs(&message("lab_element_event", event, element)),
                    "{element} {event}"
                );
            }
            assert!(
                !syncs(&message("lab_element_event", "modified", element)),
                "{element} modified"
            );
        }
        for element in ["annotation", "connectormapping", "smart_annotation"] {
            assert!(
                !syncs(&message("lab_element_event", "created", element)),
                "{element}"
            );
        }
    }

    #[test]
    fn state_changes_and_stats_sync_nothing_but_state_is_activity() {
        for step in ["QUEUED", "STARTED", "BOOTED", "STOPPED"] {
            let v = classify(&message("state_change", step, "node"));
            assert_eq!(
                (v.kind, v.sync, v.activity),
                (MessageKind::StateChange, None, true)
            );
        }
        let state = classify(&message("lab_event", "state", "lab"));
        assert!(state.activity && state.sync.is_some());
        assert!(!classify(&message("lab_event", "modified", "lab")).activity);
        for (t, kind) in [
            ("system_stats", MessageKind::SystemStats),
            ("lab_stats", MessageKind::LabStats),
            ("system_event", MessageKind::Other),
            ("ping", MessageKind::Other),
        ] {
            let v = classify(&message(t, t, ""));
            assert_eq!((v.kind, v.sync, v.activity), (kind, None, false), "{t}");
        }
    }

    #[test]
    fn what_is_not_an_envelope_is_malformed_and_bad_lab_ids_are_not_synced() {
        for text in [
            "",
            "<<not json",
            "[1, 2]",
            "null",
            "\"lab_event\"",
            "{}",
            r#"{"event": "state"}"#,
        ] {
            assert_eq!(classify(text).kind, MessageKind::Malformed, "{text}");
        }
        let no_lab = json!({"event_type": "lab_event", "event": "modified"}).to_string();
        assert_eq!(classify(&no_lab).sync, None);
        let long =
            json!({"event_type": "lab_event", "event": "modified", "lab_id": "x".repeat(500)});
        assert_eq!(classify(&long.to_string()).sync, None);
        let wrong_types = json!({"event_type": "lab_event", "event": 5, "lab_id": {"a": 1}});
        assert_eq!(
            classify(&wrong_types.to_string()).kind,
            MessageKind::Malformed
        );
    }

    #[test]
    fn a_large_data_body_is_skipped_unread() {
        let big = json!({
            "event_type": "lab_stats", "lab_id": "lab-1",
            "data": {"nodes": (0..20_000).map(|i| json!({"id": i, "cpu": 1.5})).collect::<Vec<_>>()},
        })
        .to_string();
        assert_eq!(classify(&big).kind, MessageKind::LabStats);
        // Upper and mixed case, as CML's own client reads them.
        assert!(syncs(&message("LAB_EVENT", "Modified", "LAB")));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z_]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop::sample::select(vec![
                        "event_type",
                        "event",
                        "element_type",
                        "lab_id",
                        "data",
                        "x"
                    ]),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        /// Whatever a server sends, classifying it never panics; stats never call for a sync.
        #[test]
        fn any_message_classifies(v in any_json(), stats in prop::sample::select(vec!["system_stats", "lab_stats"])) {
            let _ = classify(&v.to_string());
            let mut m = json!({"event_type": stats, "lab_id": "lab-1"});
            m["data"] = v;
            prop_assert_eq!(classify(&m.to_string()).sync, None);
        }
    }
}
