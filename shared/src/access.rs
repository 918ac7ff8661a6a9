//! Who may see which lab, as each CML server grants it — pure: no I/O.
//!
//! A worker's users and groups (its [`Directory`], read with each full sync) say who may read
//! each of its labs. A record keeps that as *principals* (`readers`): the worker's admins
//! (`a:<worker>`), its owner (`u:<worker>:<username>`), the users and the groups it is shared
//! with (`u:<worker>:<username>`, `g:<worker>:<group id>`). A group stays one principal
//! whatever its size: its members hold it through their [`Account`] on that worker. A caller
//! holds the principals of its accounts ([`grant`]); it may see a record when the two meet.
//! Every principal names its worker: an account on one server never reaches another's labs.

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
};

use serde::{Deserialize, Serialize};

/// Most principals one record keeps. Past it (a lab shared with more users and groups one by
/// one than this), the record keeps only its admins and its owner: a lab is never shown to
/// more callers than CML shows it to, at worst to fewer.
pub const MAX_READERS: usize = 1024;
/// Most users, groups and shares read from one server; a server past them is refused (its
/// last known access data stay).
pub const MAX_USERS: usize = 20_000;
pub const MAX_GROUPS: usize = 20_000;
pub const MAX_SHARES: usize = 500_000;
/// Longest username kept or looked up (CML allows 32 characters).
pub const MAX_USERNAME_BYTES: usize = 256;

/// The permissions of CML 2.9+ that let a user see a lab (any one is enough).
pub const VIEW_PERMISSIONS: [&str; 4] = ["lab_view", "lab_exec", "lab_edit", "lab_admin"];
/// The permissions of CML up to 2.8 that let a group's members see a lab.
pub const LEGACY_PERMISSIONS: [&str; 2] = ["read_only", "read_write"];

/// Whether one share's permissions let its holder see the lab.
pub fn grants_view<'a>(permissions: impl IntoIterator<Item = &'a str>) -> bool {
    permissions
        .into_iter()
        .any(|p| VIEW_PERMISSIONS.contains(&p) || LEGACY_PERMISSIONS.contains(&p))
}

/// The principal of a worker's admins.
pub fn admin_principal(worker_id: &str) -> String {
    format!("a:{worker_id}")
}

/// The principal of one user of a worker.
pub fn user_principal(worker_id: &str, username: &str) -> String {
    format!("u:{worker_id}:{username}")
}

/// The principal of one group of a worker (by its id: names change, ids do not).
pub fn group_principal(worker_id: &str, group_id: &str) -> String {
    format!("g:{worker_id}:{group_id}")
}

/// One user of a CML server, as `GET users` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirUser {
    pub id: String,
    pub username: String,
    pub admin: bool,
    /// The groups it is a member of, by id.
    pub groups: Vec<String>,
    /// The labs shared with it directly (2.9+ associations granting a view).
    pub labs: Vec<String>,
}

/// One group of a CML server, as `GET groups` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGroup {
    pub id: String,
    /// Its members, by user id.
    pub members: Vec<String>,
    /// The labs shared with it in a way that lets its members see them.
    pub labs: Vec<String>,
}

/// A CML server's users and groups: everything its sharing rule reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    pub users: Vec<DirUser>,
    pub groups: Vec<DirGroup>,
}

/// A user's account on one worker: what lab-api reads of a caller (`cml_accounts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub worker_id: String,
    pub username: String,
    pub admin: bool,
    /// The groups it is a member of on that worker, by id, sorted.
    pub groups: Vec<String>,
}

impl Account {
    /// The principals this account holds on its worker.
    pub fn principals(&self) -> Vec<String> {
        let mut p = vec![user_principal(&self.worker_id, &self.username)];
        if self.admin {
            p.push(admin_principal(&self.worker_id));
        }
        p.extend(
            self.groups
                .iter()
                .map(|g| group_principal(&self.worker_id, g)),
        );
        p
    }
}

impl Directory {
    /// Every user's account on `worker_id`: its admin flag and its groups (a membership shown
    /// on either side, the user's `groups` or the group's `members`, counts). A username seen
    /// twice keeps its first user; users without a usable name are left out.
    pub fn accounts(&self, worker_id: &str) -> Vec<Account> {
        let mut groups_of: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        for g in &self.groups {
            for m in &g.members {
                groups_of.entry(m.as_str()).or_default().insert(&g.id);
            }
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for u in &self.users {
            if !plausible_username(&u.username) || !seen.insert(u.username.as_str()) {
                continue;
            }
            let mut groups = groups_of.remove(u.id.as_str()).unwrap_or_default();
            groups.extend(u.groups.iter().map(String::as_str));
            out.push(Account {
                worker_id: worker_id.to_owned(),
                username: u.username.clone(),
                admin: u.admin,
                groups: groups.into_iter().map(str::to_owned).collect(),
            });
        }
        out
    }

    /// Each lab's shares as principals, sorted: the users it is shared with (by username) and
    /// the groups. A lab shared with nobody has no entry.
    pub fn shares(&self, worker_id: &str) -> HashMap<String, Vec<String>> {
        let mut shares: HashMap<String, BTreeSet<String>> = HashMap::new();
        for u in &self.users {
            if !plausible_username(&u.username) {
                continue;
            }
            for lab in &u.labs {
                shares
                    .entry(lab.clone())
                    .or_default()
                    .insert(user_principal(worker_id, &u.username));
            }
        }
        for g in &self.groups {
            for lab in &g.labs {
                shares
                    .entry(lab.clone())
                    .or_default()
                    .insert(group_principal(worker_id, &g.id));
            }
        }
        shares
            .into_iter()
            .map(|(lab, s)| (lab, s.into_iter().collect()))
            .collect()
    }
}

/// Whether a username can be a caller's: non-empty, bounded, no control characters.
pub fn plausible_username(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_USERNAME_BYTES && !name.chars().any(char::is_control)
}

/// Who may read a lab of `worker_id` owned by `owner_username` and shared as `shares` says:
/// the worker's admins, its owner and its shares, sorted and without repeats. Past
/// [`MAX_READERS`], only the admins and the owner.
pub fn readers(worker_id: &str, owner_username: &str, shares: &[String]) -> Vec<String> {
    let mut r: BTreeSet<String> = BTreeSet::new();
    r.insert(admin_principal(worker_id));
    if plausible_username(owner_username) {
        r.insert(user_principal(worker_id, owner_username));
    }
    if r.len() + shares.len() <= MAX_READERS {
        r.extend(shares.iter().cloned());
    }
    r.into_iter().collect()
}

/// Who a caller is: a username, and whether it administers the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub fleet_admin: bool,
}

/// What a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Everything (an admin of the fleet, or access not enforced).
    All,
    /// The records whose `readers` hold one of these principals (sorted), on the workers where
    /// the caller has an account (each with what it holds there).
    Principals {
        principals: Vec<String>,
        /// Hashed: the live stream looks a worker up for every client and every event.
        workers: HashMap<String, OnWorker>,
    },
}

/// What a caller holds on one worker where it has an account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OnWorker {
    /// Whether it administers the worker (sees all of it).
    pub admin: bool,
    /// Its principals there, sorted: what reaches the worker's records. Kept apart so that
    /// the live stream asks "what is this caller on that worker" with one lookup, however many
    /// workers the caller has accounts on.
    pub principals: Vec<String>,
}

/// What a caller may see, from who it is and its accounts on the workers (found by its
/// username; accounts of other names are ignored).
pub fn grant(identity: &Identity, accounts: &[Account]) -> Grant {
    if identity.fleet_admin {
        return Grant::All;
    }
    Grant::of_accounts(accounts.iter().filter(|a| a.username == identity.username))
}

impl Grant {
    /// The grant of a caller holding these accounts' principals (the accounts' usernames are
    /// not checked: see [`grant`]).
    pub fn of_accounts<'a>(accounts: impl IntoIterator<Item = &'a Account>) -> Self {
        let mut principals = BTreeSet::new();
        let mut workers: HashMap<String, OnWorker> = HashMap::new();
        for a in accounts {
            let mine = a.principals();
            principals.extend(mine.iter().cloned());
            let on = workers.entry(a.worker_id.clone()).or_default();
            on.admin |= a.admin;
            on.principals.extend(mine);
        }
        for on in workers.values_mut() {
            on.principals.sort();
            on.principals.dedup();
        }
        Grant::Principals {
            principals: principals.into_iter().collect(),
            workers,
        }
    }

    /// What the caller holds on one worker: one lookup, whatever is asked of it next.
    pub fn on(&self, worker_id: &str) -> Reach<'_> {
        match self {
            Grant::All => Reach::All,
            Grant::Principals { workers, .. } => match workers.get(worker_id) {
                Some(on) => Reach::Account(on),
                None => Reach::Nothing,
            },
        }
    }

    /// Whether a record of `worker_id` with these readers is visible (a record's readers all
    /// name its worker: only what the caller holds there is looked at).
    pub fn sees(&self, worker_id: &str, readers: &[String]) -> bool {
        self.on(worker_id).sees(readers)
    }

    /// Whether the caller has an account on the worker (an admin of the fleet: every worker).
    pub fn has_account(&self, worker_id: &str) -> bool {
        !matches!(self.on(worker_id), Reach::Nothing)
    }

    /// Whether the caller sees everything of the worker.
    pub fn sees_all_of(&self, worker_id: &str) -> bool {
        self.on(worker_id).sees_all()
    }

    /// The principals that reach the worker's records (none: nothing of it is visible).
    pub fn principals_on(&self, worker_id: &str) -> Cow<'_, [String]> {
        match self.on(worker_id) {
            Reach::All => Cow::Owned(vec![admin_principal(worker_id)]),
            Reach::Account(on) => Cow::Borrowed(&on.principals),
            Reach::Nothing => Cow::Borrowed(&[]),
        }
    }
}

/// What a caller holds on one worker ([`Grant::on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// Everything, everywhere.
    All,
    /// An account there.
    Account(&'a OnWorker),
    /// No account there: nothing of the worker.
    Nothing,
}

impl Reach<'_> {
    /// Whether a record of the worker with these readers is visible.
    pub fn sees(&self, readers: &[String]) -> bool {
        match self {
            Reach::All => true,
            Reach::Account(on) => readers
                .iter()
                .any(|r| on.principals.binary_search(r).is_ok()),
            Reach::Nothing => false,
        }
    }

    /// Whether everything of the worker is visible.
    pub fn sees_all(&self) -> bool {
        match self {
            Reach::All => true,
            Reach::Account(on) => on.admin,
            Reach::Nothing => false,
        }
    }
}

/// The worker a principal belongs to.
pub fn principal_worker(p: &str) -> Option<&str> {
    let (kind, rest) = p.split_once(':')?;
    match kind {
        "a" => Some(rest),
        "u" | "g" => rest.split_once(':').map(|(w, _)| w),
        _ => None,
    }
}

/// Whether a caller holding `reach` on a record's worker saw the record whose readers were
/// `before`, and sees it with `after`: what the live stream sends it (an addition, a removal,
/// a change, nothing).
pub fn transition(reach: Reach<'_>, before: &[String], after: &[String]) -> Visibility {
    match (reach.sees(before), reach.sees(after)) {
        (true, true) => Visibility::Kept,
        (false, true) => Visibility::Gained,
        (true, false) => Visibility::Lost,
        (false, false) => Visibility::Never,
    }
}

/// How a change of a record's readers looks to one caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Kept,
    Gained,
    Lost,
    Never,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn user(id: &str, name: &str, admin: bool, groups: &[&str], labs: &[&str]) -> DirUser {
        DirUser {
            id: id.into(),
            username: name.into(),
            admin,
            groups: groups.iter().map(|s| s.to_string()).collect(),
            labs: labs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn group(id: &str, members: &[&str], labs: &[&str]) -> DirGroup {
        DirGroup {
            id: id.into(),
            members: members.iter().map(|s| s.to_string()).collect(),
            labs: labs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn identity(name: &str) -> Identity {
        Identity {
            username: name.into(),
            fleet_admin: false,
        }
    }

    #[test]
    fn owners_shares_and_admins_see_a_lab_and_nobody_else() {
        let dir = Directory {
            users: vec![
                user("1", "root", true, &[], &[]),
                user("2", "alice", false, &[], &[]),
                user("3", "bob", false, &["g1"], &[]),
                user("4", "carol", false, &[], &["lab-x"]),
                user("5", "dave", false, &[], &[]),
            ],
            // dave is a member by the group's list only.
            groups: vec![group("g1", &["5"], &["lab-x"]), group("g2", &["2"], &[])],
        };
        let accounts = dir.accounts("w1");
        let shares = dir.shares("w1");
        let lab_x = readers("w1", "alice", &shares["lab-x"]);
        let lab_y = readers("w1", "alice", &[]);
        for (name, x, y) in [
            ("root", true, true),
            ("alice", true, true),
            ("bob", true, false),
            ("carol", true, false),
            ("dave", true, false),
            ("erin", false, false),
        ] {
            let g = grant(&identity(name), &accounts);
            assert_eq!(
                (g.sees("w1", &lab_x), g.sees("w1", &lab_y)),
                (x, y),
                "{name}"
            );
        }
        let admin = Identity {
            username: "nobody".into(),
            fleet_admin: true,
        };
        assert_eq!(grant(&admin, &[]), Grant::All);
    }

    #[test]
    fn an_account_on_one_worker_reaches_nothing_on_another() {
        let w1 = Directory {
            users: vec![user("1", "alice", true, &["g"], &[])],
            groups: vec![group("g", &["1"], &[])],
        };
        let w2_lab = readers("w2", "alice", &[group_principal("w2", "g")]);
        let g = grant(&identity("alice"), &w1.accounts("w1"));
        assert!(
            !g.sees("w2", &w2_lab),
            "same name, same group id, other server"
        );
        assert!(
            !g.sees("w1", &w2_lab),
            "nor through the worker it has an account on"
        );
        assert!(g.has_account("w1") && !g.has_account("w2"));
        assert!(g.sees_all_of("w1") && !g.sees_all_of("w2"));
        assert!(g.principals_on("w2").is_empty());
        assert_eq!(g.principals_on("w1").len(), 3);
    }

    #[test]
    fn a_lab_shared_past_the_limit_keeps_only_admins_and_owner() {
        let many: Vec<String> = (0..MAX_READERS)
            .map(|i| user_principal("w", &format!("u{i}")))
            .collect();
        let r = readers("w", "alice", &many);
        assert_eq!(r, vec![admin_principal("w"), user_principal("w", "alice")]);
        let few = &many[..MAX_READERS - 2];
        assert_eq!(readers("w", "alice", few).len(), MAX_READERS);
    }

    #[test]
    fn hostile_usernames_are_not_principals() {
        for bad in [
            "",
            "a\0b",
            "line\nbreak",
            &"x".repeat(MAX_USERNAME_BYTES + 1),
        ] {
            assert!(!plausible_username(bad), "{bad:?}");
            let d = Directory {
                users: vec![user("1", bad, true, &[], &["l"])],
                groups: vec![],
            };
            assert!(d.accounts("w").is_empty());
            assert!(d.shares("w").is_empty());
            assert_eq!(readers("w", bad, &[]), vec![admin_principal("w")]);
        }
        for odd in ["$ne", "a.b", "{\"$gt\":\"\"}", ".*", "o'brien"] {
            assert!(plausible_username(odd), "{odd}");
        }
    }

    #[test]
    fn permissions_that_show_a_lab() {
        assert!(grants_view(["lab_exec"]));
        assert!(grants_view(["read_only"]));
        assert!(!grants_view([]));
        assert!(!grants_view(["lab_something_new"]));
    }

    #[test]
    fn principals_name_their_worker() {
        assert_eq!(principal_worker("a:w1"), Some("w1"));
        assert_eq!(principal_worker("u:w1:al:ice"), Some("w1"));
        assert_eq!(principal_worker("g:w2:g:1"), Some("w2"));
        assert_eq!(principal_worker("x:w2"), None);
    }

    /// The rule as CML states it, computed directly from the directory: the oracle.
    fn cml_sees(dir: &Directory, name: &str, owner: &str, lab: &str) -> bool {
        let Some(u) = dir
            .users
            .iter()
            .find(|u| u.username == name && plausible_username(name))
        else {
            return false;
        };
        u.admin
            || owner == name
            || u.labs.iter().any(|l| l == lab)
            || dir.groups.iter().any(|g| {
                (g.members.contains(&u.id) || u.groups.contains(&g.id))
                    && g.labs.iter().any(|l| l == lab)
            })
    }

    fn directory() -> impl Strategy<Value = (Directory, Vec<(String, String)>)> {
        let names = ["alice", "bob", "carol", "dave", "erin"];
        (
            proptest::collection::vec(
                (
                    0..names.len(),
                    any::<bool>(),
                    proptest::collection::vec(0..3usize, 0..3),
                    proptest::collection::vec(0..6usize, 0..3),
                ),
                0..5,
            ),
            proptest::collection::vec(
                (
                    proptest::collection::vec(0..5usize, 0..4),
                    proptest::collection::vec(0..6usize, 0..4),
                ),
                0..3,
            ),
            proptest::collection::vec(0..names.len(), 6),
        )
            .prop_map(move |(users, groups, owners)| {
                let mut seen = BTreeSet::new();
                let users: Vec<DirUser> = users
                    .into_iter()
                    .enumerate()
                    .filter(|(_, (n, ..))| seen.insert(*n))
                    .map(|(i, (n, admin, gs, labs))| DirUser {
                        id: format!("u{i}"),
                        username: names[n].into(),
                        admin,
                        groups: gs.iter().map(|g| format!("g{g}")).collect(),
                        labs: labs.iter().map(|l| format!("lab{l}")).collect(),
                    })
                    .collect();
                let groups = groups
                    .into_iter()
                    .enumerate()
                    .map(|(i, (members, labs))| DirGroup {
                        id: format!("g{i}"),
                        members: members.iter().map(|m| format!("u{m}")).collect(),
                        labs: labs.iter().map(|l| format!("lab{l}")).collect(),
                    })
                    .collect();
                let labs = owners
                    .into_iter()
                    .enumerate()
                    .map(|(i, o)| (format!("lab{i}"), names[o].to_owned()))
                    .collect();
                (Directory { users, groups }, labs)
            })
    }

    proptest! {
        /// For every caller and every lab, the principals decide exactly as CML's rule does.
        #[test]
        fn principals_decide_as_cml_does((dir, labs) in directory()) {
            let accounts = dir.accounts("w");
            let shares = dir.shares("w");
            for name in ["alice", "bob", "carol", "dave", "erin", "zed"] {
                let g = grant(&identity(name), &accounts);
                for (lab, owner) in &labs {
                    let r = readers("w", owner, shares.get(lab).map_or(&[][..], Vec::as_slice));
                    prop_assert_eq!(g.sees("w", &r), cml_sees(&dir, name, owner, lab), "{} on {}", name, lab);
                }
            }
        }

        /// What a caller holds on one worker is exactly its principals that name the worker,
        /// and they decide what it sees of the worker's labs as all its principals would.
        #[test]
        fn a_callers_principals_on_a_worker_are_those_naming_it((dir, labs) in directory()) {
            let mut accounts = dir.accounts("w1");
            accounts.extend(dir.accounts("w2"));
            let shares = dir.shares("w1");
            for name in ["alice", "bob", "carol", "zed"] {
                let g = grant(&identity(name), &accounts);
                let Grant::Principals { principals, .. } = &g else { unreachable!() };
                for w in ["w1", "w2", "w3"] {
                    let naming: Vec<String> = principals
                        .iter()
                        .filter(|p| principal_worker(p) == Some(w))
                        .cloned()
                        .collect();
                    prop_assert_eq!(&*g.principals_on(w), &naming[..]);
                    prop_assert_eq!(g.has_account(w), !naming.is_empty());
                }
                for (lab, owner) in &labs {
                    let r = readers("w1", owner, shares.get(lab).map_or(&[][..], Vec::as_slice));
                    let by_any = r.iter().any(|p| principals.binary_search(p).is_ok());
                    prop_assert_eq!(g.sees("w1", &r), by_any);
                }
            }
        }
    }
}
