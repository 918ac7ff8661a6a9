//! CML JSON → a server's users and groups ([`Directory`]): `GET users` and `GET groups`, from
//! CML 2.4 (groups' `labs` with `read_only`/`read_write`) through 2.9+ (associations of groups
//! and users with lab permissions). Pure.
//!
//! Lenient per item (a user or group of an unexpected shape is skipped, keys missing or `null`
//! read as empty), strict on the whole (a body that is not a list fails) and bounded: a server
//! listing more users, groups or shares than [`shared::access`] allows is refused, never
//! half-read, so its last known access data stay.

use serde_json::Value;
use shared::access::{
    grants_view, plausible_username, DirGroup, DirUser, Directory, MAX_GROUPS, MAX_SHARES,
    MAX_USERS,
};
use shared::record::plausible_lab_id;

/// Longest user or group id kept (CML's are UUIDs).
const MAX_ID_BYTES: usize = 128;

/// The directory of a server from its `users` and `groups` bodies.
pub fn directory(users: &[u8], groups: &[u8]) -> Result<Directory, String> {
    let users = list(users, "users", MAX_USERS)?;
    let groups = list(groups, "groups", MAX_GROUPS)?;
    let mut shares = 0usize;
    let mut count = |n: usize| -> Result<(), String> {
        shares += n;
        if shares > MAX_SHARES {
            return Err(format!("more than {MAX_SHARES} lab shares"));
        }
        Ok(())
    };
    let mut dir = Directory::default();
    for u in &users {
        let (Some(id), Some(username)) = (id(u.get("id")), text(u.get("username"))) else {
            continue;
        };
        if !plausible_username(username) {
            continue;
        }
        let labs = shared_labs(u.get("associations"));
        count(labs.len())?;
        dir.users.push(DirUser {
            id,
            username: username.to_owned(),
            admin: u.get("admin").and_then(Value::as_bool).unwrap_or(false),
            groups: ids(u.get("groups")),
            labs,
        });
    }
    for g in &groups {
        let Some(id) = id(g.get("id")) else { continue };
        let mut labs = shared_labs(g.get("associations"));
        labs.extend(shared_labs(g.get("labs")));
        count(labs.len())?;
        dir.groups.push(DirGroup {
            id,
            members: ids(g.get("members")),
            labs,
        });
    }
    Ok(dir)
}

/// A body that must be a JSON list of at most `max` items.
fn list(body: &[u8], what: &str, max: usize) -> Result<Vec<Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) if items.len() > max => {
            Err(format!("the {what} listing has more than {max} entries"))
        }
        Ok(Value::Array(items)) => Ok(items),
        Ok(_) => Err(format!("the {what} listing is not a JSON array")),
        Err(e) => Err(format!("the {what} listing is not JSON ({e})")),
    }
}

fn text(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

fn id(v: Option<&Value>) -> Option<String> {
    text(v)
        .filter(|s| !s.is_empty() && s.len() <= MAX_ID_BYTES && !s.chars().any(char::is_control))
        .map(str::to_owned)
}

/// A list of ids (strings, or objects with an `id`).
fn ids(v: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| id(Some(i)).or_else(|| id(i.get("id"))))
        .collect()
}

/// The labs of a share list that let the holder see them: 2.9+ `[{id, permissions: [...]}]`,
/// up to 2.8 `[{id, permission}]`.
fn shared_labs(v: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|share| {
            let lab = text(share.get("id")).filter(|l| plausible_lab_id(l))?;
            let mut perms: Vec<&str> = match share.get("permissions") {
                Some(Value::Array(p)) => p.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            perms.extend(text(share.get("permission")));
            grants_view(perms).then(|| lab.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LAB: &str = "11111111-2222-4333-8444-555555555555";

    #[test]
    fn users_and_groups_of_2_9_and_later() {
        let users = json!([
            { "id": "u1", "username": "alice", "admin": false, "groups": ["g1"],
              "associations": [{ "id": LAB, "permissions": ["lab_exec"] },
                               { "id": "other-lab", "permissions": [] }] },
            { "id": "u2", "username": "root", "admin": true, "groups": null },
            { "id": "u3", "username": "bad\u{0}name" },
            "not a user",
            { "username": "no-id" },
        ]);
        let groups = json!([
            { "id": "g1", "name": "netops", "members": ["u1", "u9"],
              "associations": [{ "id": LAB, "permissions": ["lab_view"] }] },
            { "id": "g2", "members": null, "associations": [{ "id": LAB, "permissions": ["made_up"] }] },
        ]);
        let d =
            directory(users.to_string().as_bytes(), groups.to_string().as_bytes()).expect("reads");
        assert_eq!(d.users.len(), 2);
        assert_eq!(
            d.users[0].labs,
            [LAB],
            "a share without permissions shows nothing"
        );
        assert!(d.users[1].admin && d.users[1].groups.is_empty());
        assert_eq!(d.groups[0].members, ["u1", "u9"]);
        assert_eq!(d.groups[0].labs, [LAB]);
        assert!(
            d.groups[1].labs.is_empty(),
            "an unknown permission grants nothing"
        );
    }

    #[test]
    fn groups_of_2_4_list_their_labs() {
        let groups = json!([{ "id": "g1", "name": "n", "members": [{ "id": "u1" }],
            "labs": [{ "id": LAB, "permission": "read_only" }, { "id": LAB, "permission": "none" }] }]);
        let d = directory(b"[]", groups.to_string().as_bytes()).expect("reads");
        assert_eq!(d.groups[0].labs, [LAB]);
        assert_eq!(d.groups[0].members, ["u1"]);
    }

    #[test]
    fn a_body_of_the_wrong_shape_or_size_is_refused_whole() {
        assert!(directory(b"{}", b"[]").is_err());
        assert!(directory(b"[]", b"nope").is_err());
        let many = Value::Array(vec![json!({}); MAX_USERS + 1]).to_string();
        assert!(directory(many.as_bytes(), b"[]")
            .unwrap_err()
            .contains("more than"));
    }
}
