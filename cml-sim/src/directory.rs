//! One simulated server's users and groups, and CML's rule of who sees which lab: an admin
//! every lab; anyone else the labs they own and those shared with them (2.9+: an association of
//! the user, or of a group they are a member of, with any lab permission; 2.4: a group they are
//! a member of listing the lab).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::{Personality, SimLab, SimUser};

/// The seeded users: the fleet's admin first (it logs in with the fleet's credentials), then
/// users that log in with the password [`seeded_password`] gives.
pub const SEEDED: [(&str, &str); 4] = [
    ("admin", "Admin User"),
    ("alice", "Alice Example"),
    ("bob", ""),
    ("carol", "Carol Tester"),
];
/// The seeded groups, and which seeded users are members.
pub const SEEDED_GROUPS: [(&str, &[&str]); 4] = [
    ("netops", &["alice", "carol"]),
    ("students", &["bob"]),
    ("admins", &["admin"]),
    ("lab-team", &["carol"]),
];

/// The password of a seeded user other than the admin.
pub fn seeded_password(username: &str) -> String {
    format!("{username}-password")
}

/// The id of the `i`-th seeded user.
pub fn seeded_id(i: usize) -> String {
    format!("00000000-0000-4000-a000-{i:012}")
}

/// One user of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub username: String,
    pub fullname: String,
    #[serde(skip_serializing)]
    pub password: String,
    pub admin: bool,
    /// Group ids.
    pub groups: BTreeSet<String>,
}

impl Account {
    pub fn as_owner(&self) -> SimUser {
        SimUser {
            id: self.id.clone(),
            username: self.username.clone(),
            fullname: self.fullname.clone(),
        }
    }
}

/// One group of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub description: String,
}

/// The server's users and groups.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// By id.
    pub users: BTreeMap<String, Account>,
    /// By id.
    pub groups: BTreeMap<String, Group>,
    next_user: u64,
}

impl Directory {
    /// The seeded users and groups; `group_id` gives a group's id from its name. The admin has
    /// no password of its own: it logs in with the fleet's credentials.
    pub fn seeded(group_id: impl Fn(&str) -> String) -> Self {
        let mut d = Directory::default();
        for (name, _) in SEEDED_GROUPS {
            let id = group_id(name);
            d.groups.insert(
                id.clone(),
                Group {
                    id,
                    name: name.to_owned(),
                    description: format!("The {name} group"),
                },
            );
        }
        for (i, (username, fullname)) in SEEDED.iter().enumerate() {
            let groups = SEEDED_GROUPS
                .iter()
                .filter(|(_, members)| members.contains(username))
                .map(|(g, _)| group_id(g))
                .collect();
            let password = if i == 0 {
                String::new()
            } else {
                seeded_password(username)
            };
            d.users.insert(
                seeded_id(i),
                Account {
                    id: seeded_id(i),
                    username: (*username).to_owned(),
                    fullname: (*fullname).to_owned(),
                    password,
                    admin: i == 0,
                    groups,
                },
            );
        }
        d.next_user = SEEDED.len() as u64;
        d
    }

    pub fn by_name(&self, username: &str) -> Option<&Account> {
        self.users.values().find(|u| u.username == username)
    }

    pub fn group_by_name(&self, name: &str) -> Option<&Group> {
        self.groups.values().find(|g| g.name == name)
    }

    /// Adds a user; `None` when the name is taken.
    pub fn add_user(
        &mut self,
        username: &str,
        password: &str,
        fullname: &str,
        admin: bool,
        groups: BTreeSet<String>,
    ) -> Option<Account> {
        if self.by_name(username).is_some() {
            return None;
        }
        let id = format!("10000000-0000-4000-a000-{:012}", self.next_user);
        self.next_user += 1;
        let user = Account {
            id: id.clone(),
            username: username.to_owned(),
            fullname: fullname.to_owned(),
            password: password.to_owned(),
            admin,
            groups,
        };
        self.users.insert(id, user.clone());
        Some(user)
    }

    /// The user ids that are members of the group.
    pub fn members(&self, group_id: &str) -> Vec<String> {
        self.users
            .values()
            .filter(|u| u.groups.contains(group_id))
            .map(|u| u.id.clone())
            .collect()
    }

    /// Whether CML shows the lab to the user (by id); an unknown user sees nothing.
    pub fn sees(&self, user_id: &str, lab: &SimLab, p: Personality) -> bool {
        let Some(u) = self.users.get(user_id) else {
            return false;
        };
        u.admin || lab.owner.id == u.id || self.shared_with(user_id, lab, p)
    }

    /// Whether the lab is shared with the user: through a group it is a member of, or (2.9+)
    /// directly, with a permission that shows it.
    pub fn shared_with(&self, user_id: &str, lab: &SimLab, p: Personality) -> bool {
        let Some(u) = self.users.get(user_id) else {
            return false;
        };
        let views = |perms: &[String]| perms.iter().any(|p| p.starts_with("lab_"));
        let by_group = lab
            .groups
            .iter()
            .any(|g| u.groups.contains(&g.id) && views(&g.permissions));
        let by_user = p != Personality::V2_4
            && lab
                .user_shares
                .iter()
                .any(|s| s.id == u.id && views(&s.permissions));
        by_group || by_user
    }

    /// `GET users`: every user with its groups, the labs it owns and (2.9+) its associations,
    /// from one pass over the labs (nothing of them copied but ids and permissions).
    pub fn users_json<'a>(&self, labs: impl Iterator<Item = &'a SimLab>, p: Personality) -> Value {
        let mut owned: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut shared: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for l in labs {
            owned.entry(l.owner.id.as_str()).or_default().push(&l.id);
            for s in &l.user_shares {
                shared
                    .entry(s.id.as_str())
                    .or_default()
                    .push(json!({ "id": l.id, "permissions": s.permissions }));
            }
        }
        Value::from(
            self.users
                .values()
                .map(|u| {
                    let mut v = json!({
                        "id": u.id, "username": u.username, "fullname": u.fullname, "description": "",
                        "email": "", "admin": u.admin, "directory_dn": "", "groups": u.groups,
                        "labs": owned.get(u.id.as_str()).cloned().unwrap_or_default(),
                        "opt_in": true, "resource_pool": null, "tour_version": "", "pubkey_info": "",
                    });
                    if p != Personality::V2_4 {
                        v["associations"] =
                            json!(shared.get(u.id.as_str()).cloned().unwrap_or_default());
                    }
                    v
                })
                .collect::<Vec<_>>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::model::{SimGroup, SimShare};

    fn lab(owner: usize, groups: &[(&str, &[&str])], users: &[usize]) -> SimLab {
        let d = Directory::seeded(|n| format!("g-{n}"));
        let owner = d.users[&seeded_id(owner)].as_owner();
        SimLab {
            id: "l".into(),
            title: "t".into(),
            description: String::new(),
            notes: String::new(),
            state: "STOPPED".into(),
            owner,
            node_count: 0,
            link_count: 0,
            groups: groups
                .iter()
                .map(|(g, p)| SimGroup {
                    id: format!("g-{g}"),
                    name: (*g).into(),
                    permissions: p.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            user_shares: users
                .iter()
                .map(|&u| SimShare {
                    id: seeded_id(u),
                    permissions: vec!["lab_exec".into()],
                })
                .collect(),
            created: Utc::now(),
            modified: Utc::now(),
        }
    }

    fn who_sees(l: &SimLab, p: Personality) -> Vec<&'static str> {
        let d = Directory::seeded(|n| format!("g-{n}"));
        SEEDED
            .iter()
            .enumerate()
            .filter(|(i, _)| d.sees(&seeded_id(*i), l, p))
            .map(|(_, (name, _))| *name)
            .collect()
    }

    #[test]
    fn admins_owners_and_shares_see_a_lab() {
        // bob owns it; netops (alice, carol) may view it; carol directly too.
        let l = lab(2, &[("netops", &["lab_view"])], &[3]);
        for p in Personality::ALL {
            assert_eq!(who_sees(&l, p), ["admin", "alice", "bob", "carol"], "{p:?}");
        }
        // A share without permissions shows nothing; a user share only from 2.9 on.
        let l = lab(2, &[("netops", &[])], &[1]);
        assert_eq!(who_sees(&l, Personality::V2_4), ["admin", "bob"]);
        assert_eq!(who_sees(&l, Personality::V2_9), ["admin", "alice", "bob"]);
        assert!(!Directory::default().sees("nobody", &l, Personality::V2_10));
    }
}
