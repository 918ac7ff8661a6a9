//! The lab record: one CML lab on one worker as stored in `lab_records`, a lab as observed in
//! CML, and the tracked fields both are made of.

use std::collections::BTreeMap;

use bson::{oid::ObjectId, Bson, DateTime, Document};
use serde::{Deserialize, Deserializer, Serialize};

/// `new_state` of the history entry written when a lab disappears from its CML server.
pub const REMOVED_STATE: &str = "REMOVED";

/// The states a CML lab can be in (`QUEUED`, `BOOTED` and `STARTING` are node states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LabState {
    #[serde(rename = "DEFINED_ON_CORE")]
    DefinedOnCore,
    #[serde(rename = "STOPPED")]
    Stopped,
    #[serde(rename = "STARTED")]
    Started,
}

impl LabState {
    pub const ALL: [LabState; 3] = [
        LabState::DefinedOnCore,
        LabState::Stopped,
        LabState::Started,
    ];

    /// The name CML uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LabState::DefinedOnCore => "DEFINED_ON_CORE",
            LabState::Stopped => "STOPPED",
            LabState::Started => "STARTED",
        }
    }

    /// "DEFINED_ON_CORE, STOPPED or STARTED", for messages.
    pub fn list() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
        format!(
            "{} or {}",
            names[..names.len() - 1].join(", "),
            names[names.len() - 1]
        )
    }
}

impl std::fmt::Display for LabState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LabState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a lab state ({})", Self::list()))
    }
}

/// What CML says about a lab: the tracked fields, nothing of our own bookkeeping.
///
/// This struct is the one declaration of the tracked fields: they are stored under these names
/// (flattened into [`LabRecord`]), compared between syncs and named in history entries in this
/// order. Reading is lenient so that documents of the system this replaces still load.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabFields {
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
    /// Group names, sorted and without duplicates: CML gives them in no particular order.
    #[serde(default, deserialize_with = "null_as_default")]
    pub groups: Vec<String>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub cml_created_at: Option<DateTime>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
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

    /// The tracked fields as a document, in declaration order, dates as BSON dates.
    pub fn to_document(&self) -> Result<Document, bson::ser::Error> {
        bson::to_document(self)
    }

    /// The names of the tracked fields, in declaration order.
    pub fn names() -> Result<Vec<String>, bson::ser::Error> {
        Ok(Self::default().to_document()?.keys().cloned().collect())
    }
}

/// What a cut text ends with.
pub const TRUNCATED: &str = "… [truncated]";
/// Most group names kept per lab.
pub const MAX_GROUPS: usize = 256;
/// Longest group name kept, in characters.
pub const MAX_GROUP_NAME: usize = 256;

impl LabFields {
    /// Longest text kept per field, in characters: far above CML's own limits (title 64,
    /// description 4096, notes 32768, username 32, full name 128), low enough that a record
    /// with a full history stays well under MongoDB's 16 MiB document limit.
    pub fn text_limit(field: &str) -> usize {
        match field {
            "title" => 1024,
            "description" => 16 * 1024,
            "notes" => 64 * 1024,
            "owner_fullname" => 512,
            _ => 256,
        }
    }

    /// Cuts what is longer than its limit (ending it with [`TRUNCATED`]); returns the names of
    /// the fields cut.
    pub fn bound(&mut self) -> Vec<&'static str> {
        let mut cut = Vec::new();
        for (name, text) in [
            ("title", &mut self.title),
            ("description", &mut self.description),
            ("notes", &mut self.notes),
            ("state", &mut self.state),
            ("owner_username", &mut self.owner_username),
            ("owner_fullname", &mut self.owner_fullname),
        ] {
            if truncate(text, Self::text_limit(name)) {
                cut.push(name);
            }
        }
        let mut groups_cut = self.groups.len() > MAX_GROUPS;
        self.groups.truncate(MAX_GROUPS);
        for g in &mut self.groups {
            groups_cut |= truncate(g, MAX_GROUP_NAME);
        }
        if groups_cut {
            cut.push("groups");
        }
        cut
    }
}

/// Cuts `text` to `limit` characters, the last ones being [`TRUNCATED`]; false when it fit.
pub fn truncate(text: &mut String, limit: usize) -> bool {
    let Some((end, _)) = text.char_indices().nth(limit) else {
        return false;
    };
    let keep = limit.saturating_sub(TRUNCATED.chars().count());
    let keep_end = text.char_indices().nth(keep).map_or(end, |(i, _)| i);
    text.truncate(keep_end);
    text.push_str(TRUNCATED);
    true
}

/// Longest lab id taken from a CML server (CML's are 36-character UUIDs).
pub const MAX_LAB_ID: usize = 64;

/// Whether `id`, named by a CML server (a listing, a tile map's key, a stream message, a lab
/// object), can be a CML lab id: 1 to [`MAX_LAB_ID`] ASCII letters, digits, `-` and `_` (CML's
/// are UUIDs). Anything else (`.`, `..`, a `/`, a `%`, a space) would walk or bend the API's
/// path when asked for, or make a record no lab has, and is refused.
pub fn plausible_lab_id(id: &str) -> bool {
    (1..=MAX_LAB_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

    /// Gives the lab these groups (read apart from the lab object), in canonical form.
    pub fn set_groups(&mut self, groups: Vec<String>) {
        self.fields.groups = groups;
        self.fields = std::mem::take(&mut self.fields).canonical();
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

impl HistoryEntry {
    /// What happened to the lab, as the UI's events name it: `reappeared`, `removed`,
    /// `state_changed` or `updated`.
    pub fn action(&self) -> &'static str {
        let previous = self.previous_state.as_deref();
        if previous == Some(REMOVED_STATE) {
            "reappeared"
        } else if self.new_state == REMOVED_STATE {
            "removed"
        } else if previous.is_some_and(|p| p != self.new_state) {
            "state_changed"
        } else {
            "updated"
        }
    }
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
    #[serde(flatten)]
    pub fields: LabFields,
    #[serde(deserialize_with = "lenient_date")]
    pub first_seen_at: DateTime,
    #[serde(deserialize_with = "lenient_date")]
    pub last_synced_at: DateTime,
    #[serde(default, deserialize_with = "null_as_default")]
    pub operation_history: Vec<HistoryEntry>,
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub removed_at: Option<DateTime>,
    /// When the record was created or last changed (the time of its newest history entry);
    /// `None` on records written before it was kept. Change streams select writes by it.
    #[serde(default, deserialize_with = "lenient_optional_date")]
    pub last_changed_at: Option<DateTime>,
    /// Tracked fields this record has no observed value for: added to [`LabFields`] after the
    /// record was written (the store's upgrade marks them). The next sync adopts their first
    /// value without a history entry, as no change happened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unobserved_fields: Vec<String>,
    /// The users and groups the lab is shared with, as principals (see [`crate::access`]),
    /// from the worker's last read of its users and groups.
    #[serde(default, deserialize_with = "null_as_default")]
    pub shares: Vec<String>,
    /// Who may see the lab: its worker's admins, its owner and its shares, as principals.
    /// Empty on records written before access was kept: only admins of the fleet see them.
    #[serde(default, deserialize_with = "null_as_default")]
    pub readers: Vec<String>,
}

impl LabRecord {
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
    #[test]
    fn lab_ids_that_would_walk_or_bend_a_path_are_not_plausible() {
        assert!(plausible_lab_id("5f7c3e2a-1b4d-4e8f-9a6b-0c1d2e3f4a5b"));
        assert!(plausible_lab_id("a1b2c3"));
        for bad in [
            "", ".", "..", "a/b", "../labs", "%2e%2e", "a b", "a?b", "a#b", "\u{0}", "é", "lab.1",
        ] {
            assert!(!plausible_lab_id(bad), "{bad:?}");
        }
        assert!(plausible_lab_id(&"a".repeat(MAX_LAB_ID)));
        assert!(!plausible_lab_id(&"a".repeat(MAX_LAB_ID + 1)));
    }

    proptest! {
        /// A plausible id is one path segment as it is: nothing in it to encode, no dot.
        #[test]
        fn a_plausible_id_is_a_path_segment_as_it_is(id in "[A-Za-z0-9_./%-]{0,70}") {
            if plausible_lab_id(&id) {
                let url = url::Url::parse(&format!("http://cml/api/v0/labs/{id}")).expect("url");
                prop_assert_eq!(url.path(), format!("/api/v0/labs/{id}"));
            }
        }
    }

    use bson::doc;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn long_text_is_cut_to_its_limit_with_a_mark() {
        let mut f = LabFields {
            title: "t".repeat(10 * 1024 * 1024),
            notes: "é".repeat(70_000),
            description: "short".into(),
            groups: (0..300).map(|i| format!("g{i:03}")).collect(),
            ..LabFields::default()
        };
        assert_eq!(f.bound(), ["title", "notes", "groups"]);
        assert_eq!(f.title.chars().count(), LabFields::text_limit("title"));
        assert!(f.title.ends_with(TRUNCATED));
        assert_eq!(f.notes.chars().count(), LabFields::text_limit("notes"));
        assert_eq!(f.description, "short");
        assert_eq!(f.groups.len(), MAX_GROUPS);
        let again = f.clone();
        assert!(f.bound().is_empty(), "bounded fields stay as they are");
        assert_eq!(f, again);
    }

    #[test]
    fn lab_states_read_and_print_as_cml_names() {
        for state in LabState::ALL {
            assert_eq!(state.as_str().parse::<LabState>(), Ok(state));
            let json = serde_json::to_string(&state).expect("json");
            assert_eq!(json, format!("\"{state}\""));
        }
        assert!("BOOTED".parse::<LabState>().is_err(), "a node state");
        assert_eq!(LabState::list(), "DEFINED_ON_CORE, STOPPED or STARTED");
    }

    #[test]
    fn tracked_fields_are_stored_under_their_names_in_declaration_order() {
        let names = LabFields::names().expect("encodes");
        assert_eq!(names.first().map(String::as_str), Some("title"));
        let record = bson::to_document(&LabRecord {
            object_id: None,
            id: "x".into(),
            worker_id: "w".into(),
            lab_id: "l".into(),
            fields: LabFields::default(),
            first_seen_at: DateTime::from_millis(0),
            last_synced_at: DateTime::from_millis(0),
            operation_history: vec![],
            removed_at: None,
            last_changed_at: None,
            unobserved_fields: Vec::new(),
            shares: Vec::new(),
            readers: Vec::new(),
        })
        .expect("encodes");
        for name in &names {
            assert!(
                record.contains_key(name),
                "{name} is a top-level key of the record"
            );
        }
    }

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
        assert_eq!(
            r.fields.cml_created_at,
            parse_iso_date("2025-11-17T10:00:00Z")
        );
        assert_eq!(r.fields.node_count, 5);
        assert_eq!(r.fields.title, "");
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
            fields: LabFields {
                state: "STOPPED".into(),
                cml_created_at: Some(now),
                ..LabFields::default()
            },
            first_seen_at: now,
            last_synced_at: now,
            operation_history: vec![],
            removed_at: None,
            last_changed_at: None,
            unobserved_fields: Vec::new(),
            shares: Vec::new(),
            readers: Vec::new(),
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

    proptest! {
        /// Whatever the states, exactly one action; and removal and return are recognised
        /// whatever the other state was.
        #[test]
        fn every_entry_has_one_action(
            previous in prop::option::of(prop::sample::select(vec!["DEFINED_ON_CORE", "STOPPED", "STARTED", REMOVED_STATE])),
            new in prop::sample::select(vec!["DEFINED_ON_CORE", "STOPPED", "STARTED", REMOVED_STATE]),
        ) {
            let e = HistoryEntry {
                timestamp: DateTime::from_millis(0),
                previous_state: previous.map(str::to_owned),
                new_state: new.to_owned(),
                changed_fields: Default::default(),
            };
            let a = e.action();
            prop_assert!(["created", "updated", "state_changed", "removed", "reappeared"].contains(&a) && a != "created");
            if previous == Some(REMOVED_STATE) { prop_assert_eq!(a, "reappeared"); }
            else if new == REMOVED_STATE { prop_assert_eq!(a, "removed"); }
            else if previous.is_some_and(|p| p != new) { prop_assert_eq!(a, "state_changed"); }
            else { prop_assert_eq!(a, "updated"); }
        }
    }
}
