//! CML JSON → observed labs: lenient mapping of lab payloads from CML 2.4 through 2.10+.
//!
//! Pure. Missing optional keys, `null`s, values of an unexpected type and unknown keys never
//! fail; only a body of the wrong overall shape does. Bodies are read straight from their bytes
//! into the few fields a record needs: node and link lists are counted, not built, and unknown
//! keys are skipped without allocating (a `populate_lab_tiles` body with its topologies is
//! large, and a sync pass reads hundreds of them).

use std::{collections::HashMap, fmt, marker::PhantomData};

use serde::{
    de::{
        value::MapAccessDeserializer, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
    },
    Deserialize, Deserializer,
};

use shared::record::{
    parse_iso_date, plausible_lab_id, truncate, LabFields, ObservedLab, MAX_GROUP_NAME,
};

/// Where a server keeps the groups its labs are shared with, as its lab objects show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GroupsShape {
    /// No lab object tells: there are none, or they hold empty `groups` lists and nothing of
    /// CML 2.9 (a server before 2.9 whose labs are shared with no group).
    #[default]
    Silent,
    /// In the lab objects: at least one lists its groups (CML up to 2.8).
    InLabs,
    /// In the server's group associations: lab objects without a `groups` list (2.10+), or
    /// with 2.9's deprecated empty one beside `effective_permissions`.
    Associations,
}

impl GroupsShape {
    /// What two lab objects of one server tell together: one that lists groups settles it.
    pub fn and(self, other: GroupsShape) -> GroupsShape {
        use GroupsShape::{Associations, InLabs, Silent};
        match (self, other) {
            (InLabs, _) | (_, InLabs) => InLabs,
            (Associations, _) | (_, Associations) => Associations,
            (Silent, Silent) => Silent,
        }
    }
}

/// Labs mapped from a body, and where their server keeps their groups.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedLabs {
    pub labs: Vec<ObservedLab>,
    pub groups: GroupsShape,
    /// Labs refused, each as why (clipped): an id that is not a plausible CML lab id, or a
    /// lab object naming another id than its key.
    pub refused: Vec<String>,
}

/// The lab ids of a listing: the plausible ones, and the others (clipped), refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabIds {
    pub ids: Vec<String>,
    pub refused: Vec<String>,
}

/// Why an id named by the server is refused, if it is.
fn implausible(id: &str) -> Option<String> {
    (!plausible_lab_id(id)).then(|| format!("{:?} is not a CML lab id", clip(id)))
}

/// Maps one lab body (`GET labs/{id}`).
///
/// `lab_id` is the id the lab was asked for: an object naming another `id` is refused (it
/// would be stored as a lab it is not).
pub fn lab_from_json(lab_id: &str, body: &[u8]) -> Result<(ObservedLab, GroupsShape), LabError> {
    let MaybeLab(lab) =
        serde_json::from_slice(body).map_err(|e| LabError::Malformed(format!("not JSON ({e})")))?;
    lab.ok_or_else(|| LabError::Malformed(format!("lab {} is not a JSON object", clip(lab_id))))?
        .into_observed(lab_id)
        .map_err(LabError::Refused)
}

/// Every lab's groups, by name, from the server's groups (`GET groups`).
///
/// Names are kept once (cut to [`MAX_GROUP_NAME`]) and labs refer to them, so what this holds
/// grows with the body, whatever the number of associations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupMap {
    names: Vec<String>,
    by_lab: HashMap<String, Vec<usize>>,
}

impl GroupMap {
    /// The names of the groups `lab_id` is associated with (in no particular order).
    pub fn groups_of(&self, lab_id: &str) -> Vec<String> {
        self.by_lab.get(lab_id).map_or_else(Vec::new, |groups| {
            groups.iter().map(|&g| self.names[g].clone()).collect()
        })
    }

    /// How many groups the server listed.
    pub fn group_count(&self) -> usize {
        self.names.len()
    }
}

/// Maps a `groups` body: a JSON array of groups, each with its labs in `associations`
/// (`[{"id": <lab id>, "permissions": [...]}]`, CML 2.9+) or `labs` (`[{"id", "permission"}]`,
/// before). A group is named by its `name`, else its `id`; permissions are not kept.
pub fn group_map(body: &[u8]) -> Result<GroupMap, String> {
    let GroupList(groups) = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let groups = groups.ok_or("the groups listing is not a JSON array")?;
    let mut map = GroupMap::default();
    for g in groups {
        let Some(mut name) = g.name.0.filter(|n| !n.trim().is_empty()).or(g.id.0) else {
            continue;
        };
        truncate(&mut name, MAX_GROUP_NAME);
        let index = map.names.len();
        map.names.push(name);
        for lab_id in g.associations.0.into_iter().chain(g.labs.0) {
            map.by_lab.entry(lab_id).or_default().push(index);
        }
    }
    Ok(map)
}

/// Why a body could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadError {
    /// The body is not of the expected shape.
    Malformed(String),
    /// It names more labs than the given maximum.
    TooManyLabs(usize),
}

/// Why one lab body was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabError {
    /// The body is not a lab object.
    Malformed(String),
    /// The object names another id than it was asked for.
    Refused(String),
}

impl From<String> for PayloadError {
    fn from(detail: String) -> Self {
        PayloadError::Malformed(detail)
    }
}

/// Maps a `populate_lab_tiles` body: `{"lab_tiles": {id: lab}}`, or the bare map of labs
/// before 2.1. More than `max_labs` labs is an error; the ones past it are skipped unread.
pub fn labs_from_tiles(body: &[u8], max_labs: usize) -> Result<MappedLabs, PayloadError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let root = TilesSeed { max_labs }
        .deserialize(&mut de)
        .and_then(|root| de.end().map(|()| root))
        .map_err(|e| format!("not JSON ({e})"))?;
    let entries = match root {
        TilesBody::NotObject => {
            return Err("populate_lab_tiles did not return an object"
                .to_owned()
                .into())
        }
        TilesBody::Object {
            tiles,
            overflow: true,
        } => {
            let _ = tiles;
            return Err(PayloadError::TooManyLabs(max_labs));
        }
        TilesBody::Object {
            tiles: TileMap::Null,
            ..
        } => {
            return Ok(MappedLabs {
                labs: Vec::new(),
                groups: GroupsShape::Silent,
                refused: Vec::new(),
            })
        }
        TilesBody::Object {
            tiles: TileMap::Other,
            ..
        } => return Err("`lab_tiles` is not an object".to_owned().into()),
        TilesBody::Object {
            tiles: TileMap::Labs(entries),
            ..
        } => entries,
    };
    let mut mapped = MappedLabs {
        labs: Vec::with_capacity(entries.len()),
        groups: GroupsShape::Silent,
        refused: Vec::new(),
    };
    for (id, MaybeLab(lab)) in entries {
        if let Some(why) = implausible(&id) {
            mapped.refused.push(why);
            continue;
        }
        let lab = lab.ok_or_else(|| format!("lab {} is not a JSON object", clip(&id)))?;
        match lab.into_observed(&id) {
            Ok((lab, shape)) => {
                mapped.labs.push(lab);
                mapped.groups = mapped.groups.and(shape);
            }
            Err(why) => mapped.refused.push(why),
        }
    }
    Ok(mapped)
}

/// Maps a `labs?show_all=true` body: a JSON array of lab ids, at most `max_labs` of them;
/// those that are not plausible CML lab ids are refused.
pub fn lab_ids(body: &[u8], max_labs: usize) -> Result<LabIds, PayloadError> {
    let list: Vec<serde_json::Value> = match serde_json::from_slice(body) {
        Ok(serde_json::Value::Array(list)) => list,
        Ok(_) => return Err("the labs listing is not a JSON array".to_owned().into()),
        Err(e) => return Err(format!("not JSON ({e})").into()),
    };
    if list.len() > max_labs {
        return Err(PayloadError::TooManyLabs(max_labs));
    }
    let mut ids = LabIds::default();
    for v in list {
        match v {
            serde_json::Value::String(id) => match implausible(&id) {
                Some(why) => ids.refused.push(why),
                None => ids.ids.push(id),
            },
            other => {
                return Err(format!(
                    "the labs listing holds a non-string id: {}",
                    clip(&other.to_string())
                )
                .into())
            }
        }
    }
    Ok(ids)
}

/// Text from a CML server, cut to a length fit for an error message or a log line.
pub fn clip(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}… ({} bytes in all)", &text[..at], text.len()),
        None => text.to_owned(),
    }
}

/// The fields of a lab object a record is made of; everything else is skipped.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawLab {
    id: Text,
    lab_title: Text,
    title: Text,
    lab_description: Text,
    description: Text,
    lab_notes: Text,
    notes: Text,
    state: Text,
    owner_username: Text,
    owner_fullname: Text,
    node_count: Count,
    link_count: Count,
    topology: Topology,
    groups: Groups,
    effective_permissions: Present,
    created: Text,
    modified: Text,
}

impl RawLab {
    /// The lab listed (or asked for) as `listed_as`, unless the object names another id.
    fn into_observed(self, listed_as: &str) -> Result<(ObservedLab, GroupsShape), String> {
        let shape = if !self.groups.names.is_empty() {
            GroupsShape::InLabs
        } else if !self.groups.listed || self.effective_permissions.0 {
            GroupsShape::Associations
        } else {
            GroupsShape::Silent
        };
        if let Some(named) = self.id.0.filter(|s| !s.is_empty() && s != listed_as) {
            return Err(format!(
                "lab {} names another id: {}",
                clip(listed_as),
                clip(&named)
            ));
        }
        let topology = self.topology.0.unwrap_or_default();
        let fields = LabFields {
            title: self.lab_title.or(self.title),
            description: self.lab_description.or(self.description),
            notes: self.lab_notes.or(self.notes),
            state: self.state.0.unwrap_or_default(),
            owner_username: self.owner_username.0.unwrap_or_default(),
            owner_fullname: self.owner_fullname.0.unwrap_or_default(),
            node_count: self.node_count.0.or(topology.nodes.0).unwrap_or(0),
            link_count: self.link_count.0.or(topology.links.0).unwrap_or(0),
            groups: self.groups.names,
            cml_created_at: self.created.0.and_then(|t| parse_iso_date(&t)),
            modified_at: self.modified.0.and_then(|t| parse_iso_date(&t)),
        };
        Ok((ObservedLab::new(listed_as, fields), shape))
    }
}

/// What a lenient value makes of each JSON kind; a kind it does not take becomes the default
/// (nested arrays and objects are skipped).
trait Lenient: Default {
    fn from_str(_: &str) -> Self {
        Self::default()
    }
    fn from_i64(_: i64) -> Self {
        Self::default()
    }
    fn from_u64(v: u64) -> Self {
        Self::from_i64(i64::try_from(v).unwrap_or(i64::MAX))
    }
    fn from_f64(_: f64) -> Self {
        Self::default()
    }
    fn from_bool(_: bool) -> Self {
        Self::default()
    }
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok(T::from_str(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<T, E> {
        Ok(T::from_i64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<T, E> {
        Ok(T::from_u64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<T, E> {
        Ok(T::from_f64(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<T, E> {
        Ok(T::from_bool(v))
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::from_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
}

macro_rules! lenient_deserialize {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(LenientVisitor::<Self>(PhantomData))
            }
        }
    )*};
}
lenient_deserialize!(
    Text, Count, ListLen, Groups, GroupName, Topology, MaybeLab, Present, GroupList, MaybeGroup,
    LabRefs, LabRef
);

/// A string; numbers and booleans as their JSON text.
#[derive(Debug, Default)]
struct Text(Option<String>);

impl Text {
    fn or(self, other: Text) -> String {
        self.0.or(other.0).unwrap_or_default()
    }
}

impl Lenient for Text {
    fn from_str(v: &str) -> Self {
        Self(Some(v.to_owned()))
    }
    fn from_i64(v: i64) -> Self {
        Self(Some(v.to_string()))
    }
    fn from_u64(v: u64) -> Self {
        Self(Some(v.to_string()))
    }
    fn from_f64(v: f64) -> Self {
        Self(serde_json::Number::from_f64(v).map(|n| n.to_string()))
    }
    fn from_bool(v: bool) -> Self {
        Self(Some(v.to_string()))
    }
}

/// A non-negative count; fractions are cut, out-of-range values clamped.
#[derive(Debug, Default)]
struct Count(Option<i32>);

impl Lenient for Count {
    fn from_i64(v: i64) -> Self {
        Self(Some(v.clamp(0, i64::from(i32::MAX)) as i32))
    }
    fn from_f64(v: f64) -> Self {
        if v.is_finite() {
            Self::from_i64(v as i64)
        } else {
            Self::default()
        }
    }
}

/// The length of an array, its elements skipped.
#[derive(Debug, Default)]
struct ListLen(Option<i32>);

impl Lenient for ListLen {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut n: i32 = 0;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            n = n.saturating_add(1);
        }
        Ok(Self(Some(n)))
    }
}

/// `topology.nodes` and `topology.links`, counted.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TopologyCounts {
    nodes: ListLen,
    links: ListLen,
}

#[derive(Debug, Default)]
struct Topology(Option<TopologyCounts>);

impl Lenient for Topology {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        TopologyCounts::deserialize(MapAccessDeserializer::new(map)).map(|t| Self(Some(t)))
    }
}

/// Older servers list `{id, name, permission}` objects; 2.9 an empty list; 2.10+ nothing or null.
#[derive(Debug, Default)]
struct Groups {
    names: Vec<String>,
    /// The value was a list (empty or not).
    listed: bool,
}

impl Lenient for Groups {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut names = Vec::new();
        while let Some(GroupName(name)) = seq.next_element()? {
            names.extend(name);
        }
        Ok(Self {
            names,
            listed: true,
        })
    }
}

/// Whether a key holds anything but `null` (its value skipped).
#[derive(Debug, Default)]
struct Present(bool);

impl Lenient for Present {
    fn from_str(_: &str) -> Self {
        Self(true)
    }
    fn from_i64(_: i64) -> Self {
        Self(true)
    }
    fn from_f64(_: f64) -> Self {
        Self(true)
    }
    fn from_bool(_: bool) -> Self {
        Self(true)
    }
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self(true))
    }
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self(true))
    }
}

/// The body of `GET groups`: its groups, or `None` when it is not a list.
#[derive(Debug, Default)]
struct GroupList(Option<Vec<RawGroup>>);

impl Lenient for GroupList {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut groups = Vec::new();
        while let Some(MaybeGroup(g)) = seq.next_element()? {
            groups.extend(g);
        }
        Ok(Self(Some(groups)))
    }
}

/// The fields of a group a lab's record needs.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawGroup {
    id: Text,
    name: Text,
    /// CML 2.9+: `[{"id": <lab id>, "permissions": [...]}]`.
    associations: LabRefs,
    /// Before 2.9: `[{"id": <lab id>, "permission": ...}]`.
    labs: LabRefs,
}

/// A group object, or `None` for any other kind of value.
#[derive(Debug, Default)]
struct MaybeGroup(Option<RawGroup>);

impl Lenient for MaybeGroup {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        RawGroup::deserialize(MapAccessDeserializer::new(map)).map(|g| Self(Some(g)))
    }
}

/// The lab ids of a group's associations.
#[derive(Debug, Default)]
struct LabRefs(Vec<String>);

impl Lenient for LabRefs {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut ids = Vec::new();
        while let Some(LabRef(id)) = seq.next_element()? {
            ids.extend(id.filter(|id| !id.is_empty()));
        }
        Ok(Self(ids))
    }
}

/// A lab given by its id, or an object with an `id`.
#[derive(Debug, Default)]
struct LabRef(Option<String>);

impl Lenient for LabRef {
    fn from_str(v: &str) -> Self {
        Self(Some(v.to_owned()))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Ref {
            id: Text,
        }
        Ok(Self(
            Ref::deserialize(MapAccessDeserializer::new(map))?.id.0,
        ))
    }
}

/// A group given by name, or an object with a `name` (else an `id`).
#[derive(Debug, Default)]
struct GroupName(Option<String>);

impl Lenient for GroupName {
    fn from_str(v: &str) -> Self {
        Self(Some(v.to_owned()))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Group {
            name: Text,
            id: Text,
        }
        let g = Group::deserialize(MapAccessDeserializer::new(map))?;
        Ok(Self(g.name.0.or(g.id.0)))
    }
}

/// A lab object, or `None` for any other kind of value.
#[derive(Debug, Default)]
struct MaybeLab(Option<RawLab>);

impl Lenient for MaybeLab {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        RawLab::deserialize(MapAccessDeserializer::new(map)).map(|lab| Self(Some(lab)))
    }
}

/// The value of `lab_tiles`.
#[derive(Debug)]
enum TileMap {
    Labs(Vec<(String, MaybeLab)>),
    Null,
    Other,
}

/// A `populate_lab_tiles` body: the `lab_tiles` wrapper, or (before 2.1) labs at the top.
#[derive(Debug)]
enum TilesBody {
    Object {
        tiles: TileMap,
        /// More labs than the maximum: those past it were skipped unread.
        overflow: bool,
    },
    NotObject,
}

/// Reads a tiles body, keeping at most `max_labs` labs.
struct TilesSeed {
    max_labs: usize,
}

impl<'de> DeserializeSeed<'de> for TilesSeed {
    type Value = TilesBody;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TilesBody, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TilesSeed {
    type Value = TilesBody;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TilesBody, A::Error> {
        let mut wrapped = None;
        let mut bare = Labs::new(self.max_labs);
        while let Some(key) = map.next_key::<String>()? {
            if key == "lab_tiles" {
                wrapped = Some(map.next_value_seed(TileMapSeed {
                    max_labs: self.max_labs,
                })?);
            } else {
                bare.push(key, &mut map)?;
            }
        }
        Ok(match wrapped {
            Some((tiles, overflow)) => TilesBody::Object { tiles, overflow },
            None => TilesBody::Object {
                overflow: bare.overflow,
                tiles: TileMap::Labs(bare.labs),
            },
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TilesBody, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TilesBody::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
    fn visit_bool<E>(self, _: bool) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
    fn visit_unit<E>(self) -> Result<TilesBody, E> {
        Ok(TilesBody::NotObject)
    }
}

/// Reads the value of `lab_tiles`, keeping at most `max_labs` labs.
struct TileMapSeed {
    max_labs: usize,
}

impl<'de> DeserializeSeed<'de> for TileMapSeed {
    type Value = (TileMap, bool);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(TileMap, bool), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TileMapSeed {
    type Value = (TileMap, bool);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(TileMap, bool), A::Error> {
        let mut labs = Labs::new(self.max_labs);
        while let Some(key) = map.next_key::<String>()? {
            labs.push(key, &mut map)?;
        }
        Ok((TileMap::Labs(labs.labs), labs.overflow))
    }
    fn visit_unit<E>(self) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Null, false))
    }
    fn visit_none<E>(self) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Null, false))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(TileMap, bool), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(TileMap, bool), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok((TileMap::Other, false))
    }
    fn visit_str<E>(self, _: &str) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Other, false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Other, false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Other, false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Other, false))
    }
    fn visit_bool<E>(self, _: bool) -> Result<(TileMap, bool), E> {
        Ok((TileMap::Other, false))
    }
}

/// Labs read from a map, up to a maximum; past it, values are skipped unread.
struct Labs {
    labs: Vec<(String, MaybeLab)>,
    max: usize,
    overflow: bool,
}

impl Labs {
    fn new(max: usize) -> Self {
        Self {
            labs: Vec::new(),
            max,
            overflow: false,
        }
    }

    fn push<'de, A: MapAccess<'de>>(&mut self, key: String, map: &mut A) -> Result<(), A::Error> {
        if self.labs.len() < self.max {
            let lab: MaybeLab = map.next_value()?;
            self.labs.push((key, lab));
        } else {
            self.overflow = true;
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bson::DateTime;
    use serde_json::{json, Value};

    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 10_000;

    fn tiles(body: &[u8]) -> Result<Vec<ObservedLab>, PayloadError> {
        labs_from_tiles(body, MAX).map(|m| m.labs)
    }

    fn ids(body: &[u8]) -> Result<Vec<String>, PayloadError> {
        lab_ids(body, MAX).map(|l| l.ids)
    }

    #[test]
    fn more_labs_than_the_maximum_is_its_own_error_and_the_rest_is_not_read() {
        let many: serde_json::Map<String, Value> = (0..5)
            .map(|i| (format!("l{i}"), json!({"lab_title": "t"})))
            .collect();
        let wrapped = bytes(&json!({ "lab_tiles": many.clone() }));
        assert_eq!(labs_from_tiles(&wrapped, 5).map(|l| l.labs.len()), Ok(5));
        assert_eq!(
            labs_from_tiles(&wrapped, 4),
            Err(PayloadError::TooManyLabs(4))
        );
        assert_eq!(
            labs_from_tiles(&bytes(&Value::Object(many)), 4),
            Err(PayloadError::TooManyLabs(4))
        );
        assert_eq!(
            ids(&bytes(&json!(["a", "b", "c"]))[..]).map(|i| i.len()),
            Ok(3)
        );
        assert_eq!(
            lab_ids(&bytes(&json!(["a", "b", "c"])), 2),
            Err(PayloadError::TooManyLabs(2))
        );
    }

    #[test]
    fn text_from_cml_in_errors_is_clipped() {
        let long_id = "x".repeat(1_000_000);
        let body = bytes(&json!({ "lab_tiles": { "a": [1] , long_id.clone(): {} } }));
        let Err(PayloadError::Malformed(detail)) = tiles(&body) else {
            panic!("malformed")
        };
        assert!(detail.len() < 300, "{} bytes", detail.len());
        let body = bytes(&json!({ "lab_tiles": { long_id.clone(): {} } }));
        let refused = labs_from_tiles(&body, MAX).expect("maps").refused;
        assert!(refused[0].len() < 300, "{} bytes", refused[0].len());
        assert!(clip(&long_id).contains("1000000 bytes in all"));
        assert_eq!(clip("short"), "short");
    }

    /// One lab body mapped, without its shape, asked for as the id it names (`id` when it
    /// names none).
    fn one(id: &str, body: &[u8]) -> Result<ObservedLab, LabError> {
        let named = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned));
        lab_from_json(named.as_deref().unwrap_or(id), body).map(|(lab, _)| lab)
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).expect("serialises")
    }

    fn lab_2_4() -> Value {
        json!({
            "id": "90f84e38-a71c-4d57-8d90-00fa8a197385",
            "created": "2022-06-10T14:23:33+00:00",
            "modified": "2022-06-11T09:00:00+00:00",
            "lab_title": "Lab at Mon 17:27 PM",
            "lab_description": "",
            "lab_notes": "",
            "owner": "00000000-0000-4000-a000-000000000000",
            "owner_username": "admin",
            "state": "STOPPED",
            "node_count": 3,
            "link_count": 2,
            "groups": [{"id": "g-1", "name": "netops", "permission": "read_only"},
                       {"id": "g-2", "name": "admins", "permission": "read_write"}],
        })
    }

    #[test]
    fn a_2_4_payload_maps_group_objects_to_names_and_lacks_fullname() {
        let lab = one("x", &bytes(&lab_2_4())).expect("maps");
        assert_eq!(lab.lab_id, "90f84e38-a71c-4d57-8d90-00fa8a197385");
        assert_eq!(lab.fields.groups, ["admins", "netops"]);
        assert_eq!(lab.fields.owner_fullname, "");
        assert_eq!(lab.fields.node_count, 3);
        assert_eq!(
            lab.fields.cml_created_at,
            Some(DateTime::from_millis(1_654_871_013_000))
        );
    }

    #[test]
    fn a_2_9_payload_has_empty_groups_and_z_dates() {
        let mut v = lab_2_4();
        v["groups"] = json!([]);
        v["owner_fullname"] = json!("Admin User");
        v["created"] = json!("2022-06-10T14:23:33Z");
        v["effective_permissions"] = json!(["lab_admin"]);
        let lab = one("x", &bytes(&v)).expect("maps");
        assert!(lab.fields.groups.is_empty());
        assert_eq!(lab.fields.owner_fullname, "Admin User");
        assert_eq!(
            lab.fields.cml_created_at,
            Some(DateTime::from_millis(1_654_871_013_000))
        );
    }

    #[test]
    fn a_2_10_payload_without_groups_and_with_new_keys_maps() {
        let mut v = lab_2_4();
        v.as_object_mut().expect("object").remove("groups");
        v["autostart"] = json!({"enabled": false, "priority": null, "delay": null});
        v["node_staging"] =
            json!({"enabled": false, "start_remaining": true, "abort_on_failure": false});
        assert!(one("x", &bytes(&v)).expect("maps").fields.groups.is_empty());
        v["groups"] = Value::Null;
        assert!(one("x", &bytes(&v)).expect("maps").fields.groups.is_empty());
    }

    #[test]
    fn missing_and_null_fields_become_empty_values() {
        let lab = one(
            "only-id",
            &bytes(&json!({"state": null, "node_count": null, "created": "not a date"})),
        )
        .expect("maps");
        assert_eq!(lab.lab_id, "only-id");
        assert_eq!(lab.fields.state, "");
        assert_eq!(lab.fields.node_count, 0);
        assert_eq!(lab.fields.cml_created_at, None);
        assert!(one("x", &bytes(&json!("a string"))).is_err());
    }

    #[test]
    fn counts_fall_back_to_the_topology() {
        let lab = one(
            "x",
            &bytes(&json!({"topology": {"nodes": [{}, {}, {}], "links": [{}]}})),
        )
        .expect("maps");
        assert_eq!((lab.fields.node_count, lab.fields.link_count), (3, 1));
    }

    #[test]
    fn tiles_with_and_without_the_wrapper() {
        let tile = lab_2_4();
        let wrapped = json!({"lab_tiles": {"90f84e38-a71c-4d57-8d90-00fa8a197385": tile}});
        assert_eq!(tiles(&bytes(&wrapped)).expect("maps").len(), 1);
        let bare = json!({"90f84e38-a71c-4d57-8d90-00fa8a197385": lab_2_4()});
        assert_eq!(tiles(&bytes(&bare)).expect("maps").len(), 1);
        assert!(tiles(&bytes(&json!({"lab_tiles": {}})))
            .expect("maps")
            .is_empty());
        assert!(tiles(&bytes(&json!([1, 2]))).is_err());
        assert!(tiles(&bytes(&json!({"lab_tiles": {"x": 5}}))).is_err());
    }

    /// Ids that would walk the API's path, and objects naming another lab, are refused with
    /// their reason, whatever named them; the rest map.
    #[test]
    fn implausible_ids_and_objects_naming_another_lab_are_refused() {
        let body = bytes(&json!({"lab_tiles": {
            "..": {"lab_title": "the API's parent"},
            ".": {"lab_title": "the API's root"},
            "a/b": {},
            "good-1": {"id": "good-1", "lab_title": "kept"},
            "good-2": {"id": "someone-else", "lab_title": "not this one"},
        }}));
        let mapped = labs_from_tiles(&body, MAX).expect("maps");
        let kept: Vec<&str> = mapped.labs.iter().map(|l| l.lab_id.as_str()).collect();
        assert_eq!(kept, ["good-1"]);
        assert_eq!(mapped.refused.len(), 4, "{:?}", mapped.refused);
        assert!(mapped.refused.iter().any(|r| r.contains("someone-else")));
        let listed = lab_ids(&bytes(&json!(["..", "ok", ".", "%2e%2e"])), MAX).expect("list");
        assert_eq!(listed.ids, ["ok"]);
        assert_eq!(listed.refused.len(), 3);
        assert_eq!(
            lab_from_json("asked", &bytes(&json!({"id": "api-root"}))),
            Err(LabError::Refused(
                "lab asked names another id: api-root".into()
            ))
        );
    }

    #[test]
    fn lab_ids_must_be_a_list_of_strings() {
        assert_eq!(ids(&bytes(&json!(["a", "b"]))).expect("list"), ["a", "b"]);
        assert!(ids(&bytes(&json!({"description": "nope"}))).is_err());
        assert!(ids(&bytes(&json!([1]))).is_err());
    }

    #[test]
    fn values_of_an_unexpected_type_become_empty_values() {
        let lab = one(
            "x",
            &bytes(&json!({
                "id": "x", "lab_title": ["a"], "title": "fallback title", "state": {"x": 1},
                "owner_username": true, "node_count": "three", "link_count": 2.9,
                "topology": "none", "groups": "netops", "created": 5,
            })),
        )
        .expect("maps");
        assert_eq!(lab.lab_id, "x");
        assert!(matches!(
            lab_from_json("x", &bytes(&json!({"id": 42}))),
            Err(LabError::Refused(_))
        ));
        assert_eq!(lab.fields.title, "fallback title");
        assert_eq!(lab.fields.state, "");
        assert_eq!(lab.fields.owner_username, "true");
        assert_eq!((lab.fields.node_count, lab.fields.link_count), (0, 2));
        assert!(lab.fields.groups.is_empty());
        assert_eq!(lab.fields.cml_created_at, None);
        let counts =
            one("x", &bytes(&json!({"node_count": -4, "link_count": 1e12}))).expect("maps");
        assert_eq!(
            (counts.fields.node_count, counts.fields.link_count),
            (0, i32::MAX)
        );
    }

    #[test]
    fn a_null_tile_map_is_an_empty_listing_and_bad_tiles_name_the_lab() {
        assert!(tiles(br#"{"lab_tiles": null}"#).expect("maps").is_empty());
        let err = tiles(br#"{"lab_tiles": {"ok": {}, "bad": [1]}}"#).expect_err("bad");
        assert_eq!(
            err,
            PayloadError::Malformed("lab bad is not a JSON object".into())
        );
        assert!(tiles(b"{\"lab_tiles\": {").is_err());
        assert!(tiles(b"").is_err());
    }

    #[test]
    fn big_topologies_are_counted_and_the_id_and_groups_of_older_servers_kept() {
        let nodes: Vec<Value> = (0..40)
            .map(|i| json!({"id": format!("n{i}"), "label": "r", "interfaces": [{"id": "i"}]}))
            .collect();
        let body = json!({"lab_tiles": {"listed-id": {
            "lab_title": "T", "topology": {"nodes": nodes, "links": [{}, {}], "extra": {"deep": [[[]]]}},
            "groups": [{"id": "g-1"}, {"name": "netops", "id": "g-2"}, 7, "admins"],
        }}});
        let labs = tiles(&bytes(&body)).expect("maps");
        assert_eq!(labs.len(), 1);
        assert_eq!(labs[0].lab_id, "listed-id");
        assert_eq!(
            (labs[0].fields.node_count, labs[0].fields.link_count),
            (40, 2)
        );
        assert_eq!(labs[0].fields.groups, ["admins", "g-1", "netops"]);
    }

    fn shape(v: &Value) -> GroupsShape {
        let id = v.get("id").and_then(Value::as_str).unwrap_or("x");
        lab_from_json(id, &bytes(v)).expect("maps").1
    }

    /// Where a server keeps groups is read from what its lab objects hold, not its version.
    #[test]
    fn lab_objects_tell_where_their_groups_are() {
        assert_eq!(shape(&lab_2_4()), GroupsShape::InLabs);
        let mut v = lab_2_4();
        v["groups"] = json!([]);
        assert_eq!(shape(&v), GroupsShape::Silent, "2.4, shared with no group");
        v["effective_permissions"] = json!(["lab_admin"]);
        assert_eq!(shape(&v), GroupsShape::Associations, "2.9");
        v.as_object_mut()
            .expect("object")
            .remove("effective_permissions");
        v.as_object_mut().expect("object").remove("groups");
        assert_eq!(shape(&v), GroupsShape::Associations, "2.10: no groups key");
        v["groups"] = Value::Null;
        assert_eq!(shape(&v), GroupsShape::Associations, "null");
        v["groups"] = json!([{"id": "g", "name": "n"}]);
        v["effective_permissions"] = json!([]);
        assert_eq!(
            shape(&v),
            GroupsShape::InLabs,
            "a list that names groups wins"
        );

        // A listing: one lab listing groups settles it; otherwise any 2.9+ object does.
        let listing = |labs: Vec<Value>| {
            let map: serde_json::Map<String, Value> = labs
                .into_iter()
                .enumerate()
                .map(|(i, mut l)| {
                    l["id"] = json!(format!("l{i}"));
                    (format!("l{i}"), l)
                })
                .collect();
            labs_from_tiles(&bytes(&json!({ "lab_tiles": map })), MAX)
                .expect("maps")
                .groups
        };
        let mut silent = lab_2_4();
        silent["groups"] = json!([]);
        let mut newer = silent.clone();
        newer["effective_permissions"] = json!(["lab_view"]);
        assert_eq!(listing(vec![]), GroupsShape::Silent);
        assert_eq!(listing(vec![silent.clone()]), GroupsShape::Silent);
        assert_eq!(
            listing(vec![silent.clone(), newer.clone()]),
            GroupsShape::Associations
        );
        assert_eq!(listing(vec![newer, lab_2_4(), silent]), GroupsShape::InLabs);
    }

    #[test]
    fn group_associations_map_labs_to_group_names() {
        let body = json!([
            {"id": "g-1", "name": "netops", "description": "", "members": ["u1"],
             "associations": [{"id": "lab-a", "permissions": ["lab_view"]},
                              {"id": "lab-b", "permissions": ["lab_admin", "lab_edit"]}]},
            {"id": "g-2", "name": "", "associations": [{"id": "lab-a", "permissions": []}]},
            {"id": "g-3", "name": "old-style", "labs": [{"id": "lab-c", "permission": "read_only"}, "lab-d"]},
            {"id": "g-4", "name": "unused", "associations": []},
            {"name": null, "id": null, "associations": [{"id": "lab-x"}]},
            7, "junk", {"id": "g-5", "name": "odd", "associations": [3, {"permissions": []}, {"id": ""}, {"id": "lab-b"}]},
        ]);
        let map = group_map(&bytes(&body)).expect("maps");
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(sorted(map.groups_of("lab-a")), ["g-2", "netops"]);
        assert_eq!(sorted(map.groups_of("lab-b")), ["netops", "odd"]);
        assert_eq!(map.groups_of("lab-c"), ["old-style"]);
        assert_eq!(map.groups_of("lab-d"), ["old-style"]);
        assert!(
            map.groups_of("lab-x").is_empty(),
            "a group with no name nor id"
        );
        assert!(map.groups_of("nowhere").is_empty());
        assert_eq!(map.group_count(), 5);

        assert_eq!(group_map(b"[]").expect("maps"), GroupMap::default());
        for bad in [&b"{\"groups\": []}"[..], b"null", b"[{", b"", b"<html>"] {
            assert!(group_map(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn long_group_names_are_cut_once_however_many_labs_share_them() {
        let name = "n".repeat(100_000);
        let associations: Vec<Value> = (0..1000).map(|i| json!({"id": format!("l{i}")})).collect();
        let map = group_map(&bytes(
            &json!([{"id": "g", "name": name, "associations": associations}]),
        ))
        .expect("maps");
        let names = map.groups_of("l999");
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].chars().count(), MAX_GROUP_NAME);
        assert_eq!(map.names.len(), 1, "one name for every association");
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z0-9 ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const KEYS: [&str; 16] = [
        "id",
        "lab_title",
        "title",
        "lab_description",
        "description",
        "lab_notes",
        "notes",
        "state",
        "owner_username",
        "owner_fullname",
        "node_count",
        "link_count",
        "topology",
        "groups",
        "created",
        "modified",
    ];

    proptest! {
        /// Whatever CML puts in any field (known or not), a lab object maps.
        #[test]
        fn any_lab_object_maps(values in proptest::collection::vec(any_json(), 16), extra in any_json()) {
            let mut lab = serde_json::Map::new();
            for (key, value) in KEYS.iter().zip(values) {
                lab.insert((*key).to_owned(), value);
            }
            lab.insert("unknown_key".into(), extra);
            let body = json!({"lab_tiles": {"listed": Value::Object(lab.clone())}});
            let names_another = lab_from_json("listed", &bytes(&Value::Object(lab.clone())))
                .map(|_| false)
                .or_else(|e| match e {
                    LabError::Refused(_) => Ok(true),
                    LabError::Malformed(m) => Err(m),
                });
            prop_assert!(names_another.is_ok(), "{names_another:?}");
            let mapped = labs_from_tiles(&bytes(&body), MAX).expect("maps");
            prop_assert_eq!(mapped.labs.len() + mapped.refused.len(), 1);
            prop_assert_eq!(mapped.refused.len() == 1, names_another == Ok(true));
            // Asked for as the id it names, it maps.
            lab.insert("id".into(), json!("listed"));
            prop_assert!(one("listed", &bytes(&Value::Object(lab))).is_ok());
        }

        /// Whatever a server answers for its groups, mapping it never panics, and a list of
        /// objects maps.
        #[test]
        fn any_groups_body_maps_or_fails_cleanly(groups in proptest::collection::vec(any_json(), 0..6), extra in any_json()) {
            let objects: Vec<Value> = groups
                .iter()
                .map(|v| json!({"id": "g", "name": v, "associations": v, "labs": extra}))
                .collect();
            prop_assert!(group_map(&bytes(&Value::from(objects))).is_ok());
            let _ = group_map(&bytes(&Value::from(groups)));
            let _ = group_map(&bytes(&extra));
        }
    }
}
