//! The lab record: one CML lab on one worker as stored in `lab_records`, and a lab as observed in CML.

use std::collections::BTreeMap;

use bson::{oid::ObjectId, Bson, DateTime};
use serde::{Deserialize, Deserializer, Serialize};

/// `new_state` of the history entry written when a lab disappears from its CML server.
pub const REMOVED_STATE: &str = "REMOVED";

/// The fields compared between syncs, in the order they are reported.
pub const TRACKED_FIELDS: [&str; 11] = [
    "title",
    "description",
    "notes",
    "state",
    "owner_username",
    "owner_fullname",
    "node_count",
    "link_count",
    "groups",
    "cml_created_at",
    "modified_at",
];

/// What CML says about a lab: the tracked fields, nothing of our own bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabFields {
    pub title: String,
    pub description: String,
    pub notes: String,
    pub state: String,
    pub owner_username: String,
    pub owner_fullname: String,
    pub node_count: i32,
    pub link_count: i32,
    /// Group names, sorted and without duplicates: CML gives them in no particular order.
    pub groups: Vec<String>,
    pub cml_created_at: Option<DateTime>,
    pub modified_at: Option<DateTime>,
}

impl LabFields {
    /// Puts `groups` in canonical form; call once on every freshly observed lab.
    pub fn canonical(mut self) -> Self {
        for g in &mut self.groups {
            let trimmed = g.trim();
            if trimmed.len() != g.len() {
                *g = trimmed.to_owned();
            }
        }
        self.groups.retain(|g| !g.is_empty());
        self.groups.sort();
        self.groups.dedup();
        self
    }

    /// Each tracked field with its BSON value, in [`TRACKED_FIELDS`] order.
    pub fn values(&self) -> [(&'static str, Bson); 11] {
        let date = |d: Option<DateTime>| d.map_or(Bson::Null, Bson::DateTime);
        [
            ("title", Bson::String(self.title.clone())),
            ("description", Bson::String(self.description.clone())),
            ("notes", Bson::String(self.notes.clone())),
            ("state", Bson::String(self.state.clone())),
            ("owner_username", Bson::String(self.owner_username.clone())),
            ("owner_fullname", Bson::String(self.owner_fullname.clone())),
            ("node_count", Bson::Int32(self.node_count)),
            ("link_count", Bson::Int32(self.link_count)),
            (
                "groups",
                Bson::Array(self.groups.iter().cloned().map(Bson::String).collect()),
            ),
            ("cml_created_at", date(self.cml_created_at)),
            ("modified_at", date(self.modified_at)),
        ]
    }
}

/// A lab as one listing of a CML server showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedLab {
    pub lab_id: String,
    pub fields: LabFields,
}

impl ObservedLab {
    pub fn new(lab_id: impl Into<String>, fields: LabFields) -> Self {
        Self {
            lab_id: lab_id.into(),
            fields: fields.canonical(),
        }
    }
}

/// One old → new pair in a history entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub old: Bson,
    pub new: Bson,
}

/// One entry of `operation_history`: everything that changed in one sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    #[serde(deserialize_with = "lenient_date")]
    pub timestamp: DateTime,
    /// `None` for the entry recorded when the lab was first seen.
    #[serde(default)]
    pub previous_state: Option<String>,
    pub new_state: String,
    #[serde(default)]
    pub changed_fields: BTreeMap<String, FieldChange>,
}

/// A document of `lab_records`; field names and BSON types are the stored contract.
///
/// Reading is lenient so that documents written by the system this replaces (dates as ISO
/// strings, missing fields) still load; writing always produces BSON dates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabRecord {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<ObjectId>,
    /// Our own record id (uuid), set once when the record is created.
    #[serde(default)]
    pub id: String,
    pub worker_id: String,
    pub lab_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub notes: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub state: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub owner_username: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub owner_fullname: String,
    #[serde(default, deserialize_with = "lenient_count")]
    pub node_count: i32,
    #[serde(default, deserialize_with = "lenient_count")]
    pub link_count: i32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<String>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub cml_created_at: Option<DateTime>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub modified_at: Option<DateTime>,
    #[serde(deserialize_with = "lenient_date")]
    pub first_seen_at: DateTime,
    #[serde(deserialize_with = "lenient_date")]
    pub last_synced_at: DateTime,
    #[serde(default, deserialize_with = "null_as_default")]
    pub operation_history: Vec<HistoryEntry>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub removed_at: Option<DateTime>,
}

impl LabRecord {
    /// The tracked fields as stored.
    pub fn fields(&self) -> LabFields {
        LabFields {
            title: self.title.clone(),
            description: self.description.clone(),
            notes: self.notes.clone(),
            state: self.state.clone(),
            owner_username: self.owner_username.clone(),
            owner_fullname: self.owner_fullname.clone(),
            node_count: self.node_count,
            link_count: self.link_count,
            groups: self.groups.clone(),
            cml_created_at: self.cml_created_at,
            modified_at: self.modified_at,
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed_at.is_some()
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn lenient_count<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    Ok(match Option::<Bson>::deserialize(d)? {
        Some(Bson::Int32(n)) => n,
        Some(Bson::Int64(n)) => i32::try_from(n).unwrap_or(i32::MAX),
        Some(Bson::Double(n)) if n.is_finite() => n as i32,
        _ => 0,
    })
}

/// Parses a stored date: a BSON date, or an ISO-8601 string as the old system wrote them
/// (including its `+00:00Z` defect).
pub fn parse_iso_date(text: &str) -> Option<DateTime> {
    let text = text.trim();
    let text = text
        .strip_suffix('Z')
        .filter(|t| t.ends_with("+00:00"))
        .unwrap_or(text);
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(DateTime::from_chrono(dt.with_timezone(&chrono::Utc)));
    }
    // Naive timestamps (no offset) are UTC in CML and in the old store.
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| DateTime::from_chrono(n.and_utc()))
}

fn date_from_bson(value: Bson) -> Result<Option<DateTime>, String> {
    match value {
        Bson::DateTime(d) => Ok(Some(d)),
        Bson::Null | Bson::Undefined => Ok(None),
        Bson::String(s) if s.trim().is_empty() => Ok(None),
        Bson::String(s) => parse_iso_date(&s)
            .map(Some)
            .ok_or_else(|| format!("`{s}` is not an ISO-8601 date")),
        other => Err(format!("expected a date, found {other}")),
    }
}

fn lenient_optional_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime>, D::Error> {
    match Option::<Bson>::deserialize(d)? {
        None => Ok(None),
        Some(b) => date_from_bson(b).map_err(serde::de::Error::custom),
    }
}

fn lenient_date<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime, D::Error> {
    lenient_optional_date(d)?.ok_or_else(|| serde::de::Error::custom("date is missing"))
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    #[test]
    fn canonical_groups_are_sorted_trimmed_and_unique() {
        let f = LabFields {
            groups: vec![" b".into(), "a".into(), "b".into(), "".into()],
            ..LabFields::default()
        }
        .canonical();
        assert_eq!(f.groups, vec!["a", "b"]);
    }

    #[test]
    fn old_string_dates_load_as_dates() {
        let doc = doc! {
            "worker_id": "w", "lab_id": "l", "title": null,
            "first_seen_at": "2025-11-17T09:00:00+00:00Z",
            "last_synced_at": "2025-11-17T12:30:00Z",
            "cml_created_at": "2025-11-17T10:00:00+00:00",
            "modified_at": null,
            "node_count": 5_i64,
            "operation_history": [{"timestamp": "2025-11-17T11:00:00Z", "previous_state": "STOPPED",
                                   "new_state": "STARTED", "changed_fields": {"node_count": {"old": 0, "new": 5}}}],
        };
        let r: LabRecord = bson::from_document(doc).expect("lenient read");
        assert_eq!(
            r.first_seen_at.try_to_rfc3339_string().expect("fmt"),
            "2025-11-17T09:00:00Z"
        );
        assert_eq!(r.cml_created_at, parse_iso_date("2025-11-17T10:00:00Z"));
        assert_eq!(r.node_count, 5);
        assert_eq!(r.title, "");
        assert_eq!(
            r.operation_history[0].changed_fields["node_count"].new,
            Bson::Int32(5)
        );
    }

    #[test]
    fn records_serialize_dates_as_bson_dates() {
        let now = DateTime::now();
        let r = LabRecord {
            object_id: None,
            id: "x".into(),
            worker_id: "w".into(),
            lab_id: "l".into(),
            title: String::new(),
            description: String::new(),
            notes: String::new(),
            state: "STOPPED".into(),
            owner_username: String::new(),
            owner_fullname: String::new(),
            node_count: 0,
            link_count: 0,
            groups: vec![],
            cml_created_at: Some(now),
            modified_at: None,
            first_seen_at: now,
            last_synced_at: now,
            operation_history: vec![],
            removed_at: None,
        };
        let doc = bson::to_document(&r).expect("serialize");
        assert!(matches!(doc.get("cml_created_at"), Some(Bson::DateTime(_))));
        assert!(matches!(doc.get("last_synced_at"), Some(Bson::DateTime(_))));
        assert_eq!(doc.get("modified_at"), Some(&Bson::Null));
        assert_eq!(doc.get("removed_at"), Some(&Bson::Null));
        assert!(doc.get("_id").is_none());
        let back: LabRecord = bson::from_document(doc).expect("round trip");
        assert_eq!(back, r);
    }
}
