//! The messages of CML's `/ws/ui` event stream that a change of a simulated lab makes, and the
//! periodic stats messages: what a real 2.6+ server pushes to its web UI.
//!
//! Pure: a lab before and after a change in, the stream's JSON messages out, in the order a
//! server sends them.

use serde_json::{json, Value};

use crate::model::SimLab;

/// One message of the stream.
fn message(
    event_type: &str,
    event: &str,
    element_type: &str,
    lab_id: &str,
    element_id: &str,
    data: Value,
) -> Value {
    json!({
        "event_type": event_type, "event": event, "element_type": element_type,
        "lab_id": lab_id, "element_id": element_id, "data": data,
    })
}

/// The state of a lab's nodes when the lab is in `state` and they have settled.
pub(crate) fn node_state(lab_state: &str) -> &'static str {
    match lab_state {
        "STARTED" => "BOOTED",
        "STOPPED" => "STOPPED",
        _ => "DEFINED_ON_CORE",
    }
}

/// The id of a lab's `i`-th node (as the tiles and the topology name it).
pub fn node_id(i: u32) -> String {
    format!("n{i}")
}

/// A node as `lab_element_event` carries it.
fn node(lab: &SimLab, i: u32) -> Value {
    json!({
        "id": node_id(i), "lab_id": lab.id, "label": format!("node-{i}"), "x": i * 100, "y": 0,
        "node_definition": "iosv", "image_definition": null, "state": node_state(&lab.state),
        "configuration": null, "cpus": null, "ram": null, "tags": [],
    })
}

/// A lab's nodes as its topology lists them.
pub fn nodes(lab: &SimLab) -> Vec<Value> {
    (0..lab.node_count).map(|i| node(lab, i)).collect()
}

/// Each of a lab's nodes moved to `state` (a user starting or stopping single nodes): their
/// `state_change`s, and no lab event (the lab's own state is unchanged).
pub fn node_states(lab: &SimLab, state: &str) -> Vec<Value> {
    (0..lab.node_count)
        .map(|i| {
            message(
                "state_change",
                state,
                "node",
                &lab.id,
                &node_id(i),
                json!({ "state": state }),
            )
        })
        .collect()
}

/// The lab properties `lab_event` `created` and `modified` carry.
fn properties(lab: &SimLab) -> Value {
    json!({
        "title": lab.title, "description": lab.description, "notes": lab.notes,
        "owner": lab.owner.id,
    })
}

/// What a server sends when a lab goes from `before` to `after` (`None`: it does not exist).
pub fn lab_changed(before: Option<&SimLab>, after: Option<&SimLab>) -> Vec<Value> {
    let mut out = Vec::new();
    match (before, after) {
        (None, None) => {}
        (None, Some(lab)) => {
            out.push(message(
                "lab_event",
                "created",
                "lab",
                &lab.id,
                &lab.id,
                properties(lab),
            ));
            for i in 0..lab.node_count {
                out.push(element(lab, "created", i));
            }
            if lab.state != "DEFINED_ON_CORE" {
                out.extend(state(lab, "DEFINED_ON_CORE"));
            }
        }
        (Some(lab), None) => {
            for i in (0..lab.node_count).rev() {
                out.push(element(lab, "deleted", i));
            }
            out.push(message(
                "lab_event",
                "deleted",
                "lab",
                &lab.id,
                &lab.id,
                Value::Null,
            ));
        }
        (Some(old), Some(new)) => {
            if (&old.title, &old.description, &old.notes, &old.owner.id)
                != (&new.title, &new.description, &new.notes, &new.owner.id)
            {
                out.push(message(
                    "lab_event",
                    "modified",
                    "lab",
                    &new.id,
                    &new.id,
                    properties(new),
                ));
            }
            for i in new.node_count..old.node_count {
                out.push(element(old, "deleted", i));
            }
            for i in old.node_count..new.node_count {
                out.push(element(new, "created", i));
            }
            if old.state != new.state {
                out.extend(state(new, &old.state));
            }
        }
    }
    out
}

fn element(lab: &SimLab, event: &str, i: u32) -> Value {
    message(
        "lab_element_event",
        event,
        "node",
        &lab.id,
        &node_id(i),
        node(lab, i),
    )
}

/// A lab that moved from `was` to its state: its nodes' `state_change`s (a start goes through
/// `QUEUED` and `STARTED` to `BOOTED`), then the lab's own `state` event.
fn state(lab: &SimLab, was: &str) -> Vec<Value> {
    let steps: &[&str] = match (node_state(was), node_state(&lab.state)) {
        (from, to) if from == to => &[],
        (_, "BOOTED") => &["QUEUED", "STARTED", "BOOTED"],
        (_, to) => match to {
            "STOPPED" => &["STOPPED"],
            _ => &["DEFINED_ON_CORE"],
        },
    };
    let mut out = Vec::new();
    for step in steps {
        for i in 0..lab.node_count {
            out.push(message(
                "state_change",
                step,
                "node",
                &lab.id,
                &node_id(i),
                json!({ "state": step }),
            ));
        }
    }
    out.push(message(
        "lab_event",
        "state",
        "lab",
        &lab.id,
        &lab.id,
        json!({ "state": lab.state }),
    ));
    out
}

/// The server-wide `system_stats` message (about every 3.3 s on a real server).
pub fn system_stats(labs: usize, running: usize) -> Value {
    json!({
        "event_type": "system_stats", "event": "system_stats", "element_type": "system",
        "lab_id": null, "element_id": null,
        "data": {
            "computes": { "local": { "cpu": { "percent": 3.5 }, "memory": { "used": 1 << 30, "total": 32_u64 << 30 } } },
            "all": { "labs": labs, "running_labs": running },
        },
    })
}

/// `lab_stats` of one running lab (about every 3.3 s per running lab).
pub fn lab_stats(lab: &SimLab) -> Value {
    json!({
        "event_type": "lab_stats", "event": "lab_stats", "element_type": "lab",
        "lab_id": lab.id, "element_id": lab.id,
        "data": { "nodes": lab.node_count, "links": lab.link_count, "cpu": 1.5 },
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::model::SimWorker;

    fn lab(state: &str, nodes: u32) -> SimLab {
        SimLab {
            id: "lab-1".into(),
            title: "T".into(),
            description: String::new(),
            notes: String::new(),
            state: state.into(),
            owner: SimWorker::users().remove(1),
            node_count: nodes,
            link_count: nodes.saturating_sub(1),
            groups: Vec::new(),
            user_shares: Vec::new(),
            created: Utc::now(),
            modified: Utc::now(),
        }
    }

    /// `(event_type, event, element_type)` of each message.
    fn kinds(messages: &[Value]) -> Vec<(String, String, String)> {
        messages
            .iter()
            .map(|m| {
                let s = |k: &str| m[k].as_str().unwrap_or_default().to_owned();
                (s("event_type"), s("event"), s("element_type"))
            })
            .collect()
    }

    fn k(t: &str, e: &str, el: &str) -> (String, String, String) {
        (t.into(), e.into(), el.into())
    }

    #[test]
    fn a_start_sends_each_nodes_steps_then_the_labs_state() {
        let (before, after) = (lab("STOPPED", 2), lab("STARTED", 2));
        let m = lab_changed(Some(&before), Some(&after));
        let mut want = Vec::new();
        for step in ["QUEUED", "STARTED", "BOOTED"] {
            want.extend([
                k("state_change", step, "node"),
                k("state_change", step, "node"),
            ]);
        }
        want.push(k("lab_event", "state", "lab"));
        assert_eq!(kinds(&m), want);
        assert_eq!(
            m.last().map(|m| &m["data"]["state"]),
            Some(&json!("STARTED"))
        );
        assert_eq!(m[1]["element_id"], "n1");
        let stop = lab_changed(Some(&after), Some(&before));
        assert_eq!(
            kinds(&stop),
            [
                k("state_change", "STOPPED", "node"),
                k("state_change", "STOPPED", "node"),
                k("lab_event", "state", "lab")
            ]
        );
    }

    #[test]
    fn properties_nodes_creation_and_deletion_each_send_their_events() {
        let old = lab("DEFINED_ON_CORE", 1);
        let mut new = old.clone();
        new.title = "renamed".into();
        new.node_count = 3;
        let m = lab_changed(Some(&old), Some(&new));
        assert_eq!(
            kinds(&m),
            [
                k("lab_event", "modified", "lab"),
                k("lab_element_event", "created", "node"),
                k("lab_element_event", "created", "node")
            ]
        );
        assert_eq!(m[0]["data"]["title"], "renamed");
        assert_eq!(m[0]["data"]["owner"], old.owner.id.as_str());
        assert_eq!(
            (m[1]["element_id"].as_str(), m[2]["element_id"].as_str()),
            (Some("n1"), Some("n2"))
        );
        assert_eq!(
            kinds(&lab_changed(Some(&new), Some(&old))),
            [
                k("lab_event", "modified", "lab"),
                k("lab_element_event", "deleted", "node"),
                k("lab_element_event", "deleted", "node")
            ]
        );
        assert_eq!(
            kinds(&lab_changed(None, Some(&lab("STOPPED", 1)))),
            [
                k("lab_event", "created", "lab"),
                k("lab_element_event", "created", "node"),
                k("state_change", "STOPPED", "node"),
                k("lab_event", "state", "lab")
            ]
        );
        assert_eq!(
            kinds(&lab_changed(Some(&old), None)),
            [
                k("lab_element_event", "deleted", "node"),
                k("lab_event", "deleted", "lab")
            ]
        );
        assert!(
            lab_changed(Some(&old), Some(&old)).is_empty(),
            "no change, no message"
        );
        // Changes a record does not keep (groups, `modified`) send nothing either.
        let mut touched = old.clone();
        touched.modified = Utc::now() + chrono::Duration::seconds(5);
        assert!(lab_changed(Some(&old), Some(&touched)).is_empty());
    }

    #[test]
    fn every_message_has_the_envelope_cisco_s_client_reads() {
        let l = lab("STARTED", 2);
        let all: Vec<Value> = lab_changed(None, Some(&l))
            .into_iter()
            .chain([system_stats(3, 1), lab_stats(&l)])
            .collect();
        for m in all {
            for key in [
                "event_type",
                "event",
                "element_type",
                "lab_id",
                "element_id",
                "data",
            ] {
                assert!(m.get(key).is_some(), "{key} in {m}");
            }
        }
    }
}
