//! CML JSON → observed labs: lenient mapping of lab payloads from CML 2.4 through 2.10+.
//!
//! Pure. Missing optional keys, `null`s and unknown keys never fail; only a body of the wrong
//! overall shape does.

use serde_json::{Map, Value};

use crate::record::{parse_iso_date, LabFields, ObservedLab};

/// Maps one lab object (`GET labs/{id}` or a tile of `populate_lab_tiles`).
///
/// `lab_id` is the id the lab was listed under; the object's own `id` wins when present.
pub fn lab_from_json(lab_id: &str, lab: &Value) -> Result<ObservedLab, String> {
    let obj = lab
        .as_object()
        .ok_or_else(|| format!("lab {lab_id} is not a JSON object"))?;
    let id = text(obj, "id")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| lab_id.to_owned());
    let topology = obj.get("topology").and_then(Value::as_object);
    let fields = LabFields {
        title: text(obj, "lab_title")
            .or_else(|| text(obj, "title"))
            .unwrap_or_default(),
        description: text(obj, "lab_description")
            .or_else(|| text(obj, "description"))
            .unwrap_or_default(),
        notes: text(obj, "lab_notes")
            .or_else(|| text(obj, "notes"))
            .unwrap_or_default(),
        state: text(obj, "state").unwrap_or_default(),
        owner_username: text(obj, "owner_username").unwrap_or_default(),
        owner_fullname: text(obj, "owner_fullname").unwrap_or_default(),
        node_count: count(obj, "node_count")
            .or_else(|| topology.and_then(|t| list_len(t, "nodes")))
            .unwrap_or(0),
        link_count: count(obj, "link_count")
            .or_else(|| topology.and_then(|t| list_len(t, "links")))
            .unwrap_or(0),
        groups: groups(obj.get("groups")),
        cml_created_at: text(obj, "created").and_then(|t| parse_iso_date(&t)),
        modified_at: text(obj, "modified").and_then(|t| parse_iso_date(&t)),
    };
    Ok(ObservedLab::new(id, fields))
}

/// Maps a `populate_lab_tiles` body: `{"lab_tiles": {id: lab}}`, or the bare map of servers
/// before 2.1.
pub fn labs_from_tiles(body: &Value) -> Result<Vec<ObservedLab>, String> {
    let root = body
        .as_object()
        .ok_or("populate_lab_tiles did not return an object")?;
    let tiles = match root.get("lab_tiles") {
        Some(Value::Object(tiles)) => tiles,
        Some(Value::Null) => return Ok(Vec::new()),
        Some(_) => return Err("`lab_tiles` is not an object".into()),
        None => root,
    };
    tiles
        .iter()
        .map(|(id, lab)| lab_from_json(id, lab))
        .collect()
}

/// Maps a `labs?show_all=true` body: a JSON array of lab ids.
pub fn lab_ids(body: &Value) -> Result<Vec<String>, String> {
    let list = body
        .as_array()
        .ok_or("the labs listing is not a JSON array")?;
    list.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("the labs listing holds a non-string id: {v}"))
        })
        .collect()
}

fn text(obj: &Map<String, Value>, key: &str) -> Option<String> {
    match obj.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn count(obj: &Map<String, Value>, key: &str) -> Option<i32> {
    let n = obj.get(key)?;
    let v = n
        .as_i64()
        .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))?;
    Some(v.clamp(0, i64::from(i32::MAX)) as i32)
}

fn list_len(obj: &Map<String, Value>, key: &str) -> Option<i32> {
    obj.get(key)?
        .as_array()
        .map(|a| i32::try_from(a.len()).unwrap_or(i32::MAX))
}

/// Older servers list `{id, name, permission}` objects; 2.9 an empty list; 2.10+ nothing or null.
fn groups(value: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(items)) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|g| match g {
            Value::String(name) => Some(name.clone()),
            Value::Object(o) => o
                .get("name")
                .and_then(Value::as_str)
                .or_else(|| o.get("id").and_then(Value::as_str))
                .map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bson::DateTime;
    use serde_json::json;

    use super::*;

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
        let lab = lab_from_json("x", &lab_2_4()).expect("maps");
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
        let lab = lab_from_json("x", &v).expect("maps");
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
        assert!(lab_from_json("x", &v)
            .expect("maps")
            .fields
            .groups
            .is_empty());
        v["groups"] = Value::Null;
        assert!(lab_from_json("x", &v)
            .expect("maps")
            .fields
            .groups
            .is_empty());
    }

    #[test]
    fn missing_and_null_fields_become_empty_values() {
        let lab = lab_from_json(
            "only-id",
            &json!({"state": null, "node_count": null, "created": "not a date"}),
        )
        .expect("maps");
        assert_eq!(lab.lab_id, "only-id");
        assert_eq!(lab.fields.state, "");
        assert_eq!(lab.fields.node_count, 0);
        assert_eq!(lab.fields.cml_created_at, None);
        assert!(lab_from_json("x", &json!("a string")).is_err());
    }

    #[test]
    fn counts_fall_back_to_the_topology() {
        let lab = lab_from_json(
            "x",
            &json!({"topology": {"nodes": [{}, {}, {}], "links": [{}]}}),
        )
        .expect("maps");
        assert_eq!((lab.fields.node_count, lab.fields.link_count), (3, 1));
    }

    #[test]
    fn tiles_with_and_without_the_wrapper() {
        let tile = lab_2_4();
        let wrapped = json!({"lab_tiles": {"90f84e38-a71c-4d57-8d90-00fa8a197385": tile}});
        assert_eq!(labs_from_tiles(&wrapped).expect("maps").len(), 1);
        let bare = json!({"90f84e38-a71c-4d57-8d90-00fa8a197385": lab_2_4()});
        assert_eq!(labs_from_tiles(&bare).expect("maps").len(), 1);
        assert!(labs_from_tiles(&json!({"lab_tiles": {}}))
            .expect("maps")
            .is_empty());
        assert!(labs_from_tiles(&json!([1, 2])).is_err());
        assert!(labs_from_tiles(&json!({"lab_tiles": {"x": 5}})).is_err());
    }

    #[test]
    fn lab_ids_must_be_a_list_of_strings() {
        assert_eq!(lab_ids(&json!(["a", "b"])).expect("list"), ["a", "b"]);
        assert!(lab_ids(&json!({"description": "nope"})).is_err());
        assert!(lab_ids(&json!([1])).is_err());
    }
}
