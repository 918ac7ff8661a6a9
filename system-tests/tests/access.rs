//! Who sees what, judged against CML's own answer: a fleet of one worker per release with
//! random users, groups, admins and shares; the real daemon syncs it, the real lab-api serves
//! it; for every user and every read route, lab-api's labs must be exactly those each
//! simulated CML server lists for that user — after the first sync, through a round of lab
//! changes (each user's live stream gets exactly the events of the labs it may see), and after
//! random share changes and revocations.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use cml_sim::{
    model::{Rng, LAB_PERMISSIONS},
    SimGroup, SimShare, SimWorker,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use system_tests::{
    sse::{Next, SseStream},
    Fixture,
};

/// The callers: the seeded users (on every server), two made on some servers only, one
/// nowhere; each with a static token `<name>-token`.
const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "zed"];
const GROUPS: [&str; 3] = ["netops", "students", "lab-team"];

/// A (worker, lab) pair.
type Key = (String, String);

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Random memberships, admins and shares on every worker; dave and erin on some workers only.
fn scramble(workers: &[std::sync::Arc<SimWorker>], rng: &mut Rng, round: u64) {
    for w in workers {
        for name in ["dave", "erin"] {
            if w.directory(|d| d.by_name(name).is_none()) && rng.below(3) > 0 {
                w.directory(|d| d.add_user(name, "pw", "", false, BTreeSet::new()));
            }
        }
        let group_ids: Vec<String> = GROUPS.iter().map(|g| w.group_named(g)).collect();
        let user_ids: Vec<String> = w.directory(|d| {
            d.users
                .values()
                .filter(|u| u.username != "admin")
                .map(|u| u.id.clone())
                .collect()
        });
        w.directory(|d| {
            for id in &user_ids {
                let u = d.users.get_mut(id).expect("user");
                u.groups = group_ids
                    .iter()
                    .filter(|_| rng.below(3) == 0)
                    .cloned()
                    .collect();
                // Now and then an admin of one server.
                u.admin = rng.below(10) == 0 && round > 0;
            }
        });
        for lab in w.lab_ids() {
            let mut groups: Vec<SimGroup> = Vec::new();
            for (name, id) in GROUPS.iter().zip(&group_ids) {
                if rng.below(4) == 0 {
                    groups.push(SimGroup {
                        id: id.clone(),
                        name: (*name).into(),
                        // Sometimes no permission at all: a share that shows nothing.
                        permissions: match rng.below(4) {
                            0 => Vec::new(),
                            n => vec![LAB_PERMISSIONS[n as usize].to_owned()],
                        },
                    });
                }
            }
            let mut shares: Vec<SimShare> = Vec::new();
            for id in &user_ids {
                if rng.below(6) == 0 {
                    shares.push(SimShare {
                        id: id.clone(),
                        permissions: vec![LAB_PERMISSIONS[rng.below(4) as usize].to_owned()],
                    });
                }
            }
            w.update_lab_quietly(&lab, |l| {
                l.groups = groups;
                l.user_shares = shares;
            });
        }
    }
}

/// What CML lists for each user, over the fleet.
fn cml_truth(workers: &[std::sync::Arc<SimWorker>]) -> BTreeMap<&'static str, BTreeSet<Key>> {
    USERS
        .iter()
        .map(|name| {
            let seen = workers
                .iter()
                .flat_map(|w| {
                    let id = w.directory(|d| d.by_name(name).map(|u| u.id.clone()));
                    id.map(|id| w.labs_visible_to(&id))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|l| (w.id.clone(), l.id))
                        .collect::<Vec<_>>()
                })
                .collect();
            (*name, seen)
        })
        .collect()
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str, user: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(format!("{user}-token"))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The ids of the labs `/api/workers/{worker}/labs` shows `user`.
    async fn labs_of(&self, worker: &str, user: &str) -> Vec<String> {
        let (_, v) = self.get(&format!("/api/workers/{worker}/labs"), user).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What every read route shows `user`, each as a set (they must agree); and how many
    /// requests that took.
    async fn seen(
        &self,
        user: &str,
        workers: &[String],
        all: &BTreeSet<Key>,
        routes: &mut usize,
    ) -> BTreeSet<Key> {
        let ids = |v: &Value, w: &str| -> BTreeSet<Key> {
            v.as_array()
                .unwrap_or_else(|| panic!("{user}: not a list: {v}"))
                .iter()
                .map(|l| {
                    let worker = l["worker_id"].as_str().unwrap_or(w).to_owned();
                    (worker, l["id"].as_str().expect("id").to_owned())
                })
                .collect()
        };
        let mut by_worker = BTreeSet::new();
        let mut legacy = BTreeSet::new();
        let mut filtered = BTreeSet::new();
        for w in workers {
            let (s, v) = self.get(&format!("/api/workers/{w}/labs"), user).await;
            assert_eq!(s, 200, "{user} {w}");
            by_worker.extend(ids(&v, w));
            let (_, v) = self
                .get(
                    &format!("/api/labs/region/us-east-1/workers/{w}/labs"),
                    user,
                )
                .await;
            legacy.extend(ids(&v, w));
            let (_, v) = self.get(&format!("/api/labs?worker_id={w}"), user).await;
            filtered.extend(ids(&v["items"], w));
            *routes += 3;
        }
        let mut paged = BTreeSet::new();
        let mut path = "/api/labs?limit=7".to_owned();
        loop {
            let (s, v) = self.get(&path, user).await;
            assert_eq!(s, 200);
            *routes += 1;
            paged.extend(ids(&v["items"], ""));
            match v["next_cursor"].as_str() {
                Some(c) => path = format!("/api/labs?limit=7&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(legacy, by_worker, "{user}: the legacy path");
        assert_eq!(filtered, by_worker, "{user}: /api/labs?worker_id");
        assert_eq!(paged, by_worker, "{user}: /api/labs, page by page");
        // Every lab of the fleet, one by one: 200 exactly for those seen.
        for (w, l) in all {
            let (s, _) = self.get(&format!("/api/workers/{w}/labs/{l}"), user).await;
            *routes += 1;
            let want = if by_worker.contains(&(w.clone(), l.clone())) {
                200
            } else {
                404
            };
            assert_eq!(s, want, "{user}: {w}/{l}");
        }
        by_worker
    }
}

async fn check_round(
    api: &Api,
    workers: &[std::sync::Arc<SimWorker>],
    round: &str,
    routes: &mut usize,
) {
    let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
    let all: BTreeSet<Key> = workers
        .iter()
        .flat_map(|w| w.lab_ids().into_iter().map(|l| (w.id.clone(), l)))
        .collect();
    let truth = cml_truth(workers);
    for user in USERS {
        let seen = api.seen(user, &ids, &all, routes).await;
        assert_eq!(
            seen, truth[user],
            "{round}: {user} sees what CML lists for it"
        );
    }
    let admin = api.seen("admin", &ids, &all, routes).await;
    assert_eq!(admin, all, "{round}: the fleet's admin sees everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_sees_exactly_what_cml_lists_for_it_on_every_route_and_in_the_stream() {
    let f = Fixture::new("access_as_cml", 3, 12).await;
    let workers = f.fleet.fleet.workers.clone();
    let mut rng = Rng::new(0x5eed_acce55);
    scramble(&workers, &mut rng, 0);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));

    let config = f.dir.path().join("lab-api.toml");
    let tokens: Vec<String> = USERS
        .iter()
        .map(|u| {
            format!(
                "{{ sha256 = \"{}\", username = \"{u}\" }}",
                digest(&format!("{u}-token"))
            )
        })
        .collect();
    std::fs::write(
        &config,
        format!(
            "[api.auth]\nmode = \"tokens\"\ntoken_hashes = [\"{}\"]\ntokens = [{}]\n",
            digest("admin-token"),
            tokens.join(", ")
        ),
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let (_lab_api, base) = f
        .spawn_api(
            "lab-api",
            &[
                ("CML_LABS_CONFIG", config.as_str()),
                ("CML_LABS_API__AUTH__MODE", "tokens"),
            ],
        )
        .await;
    let api = Api {
        base: base.clone(),
        http: reqwest::Client::new(),
    };
    let mut routes = 0;
    check_round(&api, &workers, "first sync", &mut routes).await;

    // A round of lab changes, followed live by every user.
    let mut streams = Vec::new();
    for user in USERS.iter().chain(&["admin"]) {
        streams.push((*user, stream_of(&base, user, "worker.labs.updated").await));
    }
    // And each user's syncs, with its own counts.
    let mut syncs = Vec::new();
    for user in USERS {
        syncs.push((user, stream_of(&base, user, "worker.data.refreshed").await));
    }
    let mut changed: BTreeSet<Key> = BTreeSet::new();
    for w in &workers {
        for lab in w.lab_ids() {
            if rng.below(3) == 0 {
                let title = format!("changed {}", rng.below(1_000_000));
                w.update_lab(&lab, |l| l.title = title);
                changed.insert((w.id.clone(), lab));
            }
        }
    }
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    let truth = cml_truth(&workers);
    let (_, admin_stream) = streams.last_mut().expect("admin");
    let admin_seen = admin_stream
        .until(Duration::from_secs(60), |frames| {
            frames.len() >= changed.len()
        })
        .await;
    assert_eq!(
        admin_seen.len(),
        changed.len(),
        "the admin gets every change"
    );
    // Every frame was queued for every client when the admin's last one was: what each user
    // has now is all it will get of this round.
    let mut events = 0;
    for (user, s) in streams.iter_mut().take(USERS.len()) {
        let mut got = BTreeSet::new();
        loop {
            match s.next(Duration::from_millis(500)).await {
                Ok(frame) => {
                    let d = frame.data();
                    got.insert((
                        d["worker_id"].as_str().unwrap_or("").to_owned(),
                        d["lab_id"].as_str().unwrap_or("").to_owned(),
                    ));
                    assert!(
                        d.get("title").is_some(),
                        "{user}: a change of a lab it sees: {d}"
                    );
                }
                Err(Next::Quiet) => break,
                Err(Next::Ended) => panic!("{user}: the stream ended"),
            }
        }
        let want: BTreeSet<Key> = changed.intersection(&truth[user]).cloned().collect();
        assert_eq!(
            got, want,
            "{user}: the events of exactly the changed labs it sees"
        );
        events += got.len();
    }
    // A sync of each worker where the user has a user, counting the labs it sees there.
    for (user, s) in &mut syncs {
        let want: BTreeMap<String, usize> = workers
            .iter()
            .filter(|w| w.directory(|d| d.by_name(user).is_some()))
            .map(|w| {
                let n = truth[user].iter().filter(|(id, _)| *id == w.id).count();
                (w.id.clone(), n)
            })
            .collect();
        let frames = if want.is_empty() {
            Vec::new()
        } else {
            s.until(Duration::from_secs(60), |f| f.len() >= want.len())
                .await
        };
        let got: BTreeMap<String, usize> = frames
            .iter()
            .map(|f| {
                let d = f.data();
                let n = d["lab_count"].as_u64().unwrap_or(u64::MAX);
                assert_eq!(d["labs_synced"], d["lab_count"], "{user}: {d}");
                let worker = d["worker_id"].as_str().unwrap_or("").to_owned();
                let admin = workers.iter().any(|w| {
                    w.id == worker && w.directory(|d| d.by_name(user).is_some_and(|u| u.admin))
                });
                assert!(
                    admin || d["labs_created"].is_null(),
                    "{user}: only its own figures: {d}"
                );
                (worker, usize::try_from(n).unwrap_or(usize::MAX))
            })
            .collect();
        assert_eq!(
            got, want,
            "{user}: one sync per worker it has a user on, its own count"
        );
        assert_eq!(
            s.next(Duration::from_millis(500)).await,
            Err(Next::Quiet),
            "{user}: nothing of the workers it has no user on"
        );
        events += frames.len();
    }
    check_round(&api, &workers, "after lab changes", &mut routes).await;

    // Shares changed and withdrawn, memberships and admins reshuffled: after the next full
    // sync every set matches again.
    scramble(&workers, &mut rng, 1);
    let out = f.once(&[]).await;
    assert!(out.status.success(), "{}", system_tests::output_text(&out));
    check_round(&api, &workers, "after share changes", &mut routes).await;
    println!(
        "{} users (and the fleet's admin) × {routes} route reads over 3 rounds; {events} live events checked",
        USERS.len()
    );
}

/// `user`'s stream of the events of one type, connected.
async fn stream_of(base: &str, user: &str, event_type: &str) -> SseStream {
    let auth = format!("Bearer {user}-token");
    let mut s = SseStream::open(
        &format!("{base}/api/events/stream?event_types={event_type}"),
        &[("authorization", auth.as_str())],
    )
    .await
    .unwrap_or_else(|r| panic!("{user}: stream refused: {}", r.status()));
    assert_eq!(s.expect(Duration::from_secs(10)).await.event, "connected");
    s
}

/// Every lab of `w` owned by alice; the first shared with the group `group` (viewing), the
/// others with nobody. The group as shared.
fn share_only_the_first(w: &SimWorker, group: &str) -> SimGroup {
    let shared = SimGroup {
        id: w.group_named(group),
        name: group.into(),
        permissions: vec!["lab_view".into()],
    };
    let alice = w
        .directory(|d| d.by_name("alice").map(|u| u.as_owner()))
        .expect("alice");
    for (i, lab) in w.lab_ids().iter().enumerate() {
        let groups = if i == 0 {
            vec![shared.clone()]
        } else {
            Vec::new()
        };
        let owner = alice.clone();
        w.update_lab_quietly(lab, |l| {
            l.groups = groups;
            l.user_shares = Vec::new();
            l.owner = owner;
        });
    }
    shared
}

/// lab-api with one static token, `bob-token`, naming the user bob.
async fn api_for_bob(f: &Fixture) -> (system_tests::Daemon, String) {
    let config = f.dir.path().join("lab-api.toml");
    std::fs::write(
        &config,
        format!(
            "[api.auth]\nmode = \"tokens\"\ntokens = [{{ sha256 = \"{}\", username = \"bob\" }}]\n",
            digest("bob-token")
        ),
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    f.spawn_api(
        "lab-api",
        &[
            ("CML_LABS_CONFIG", config.as_str()),
            ("CML_LABS_API__AUTH__MODE", "tokens"),
        ],
    )
    .await
}

/// A share withdrawn on a CML server stops showing within `sync.access_interval`, through a
/// read of users and groups alone (the cycle is an hour away), and a stream of the user who
/// lost it gets the removal; a group joined shows its labs the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_share_stops_showing_within_the_access_interval() {
    let f = Fixture::new("access_revoked", 2, 4).await;
    let w = f.fleet.fleet.workers[1].clone();
    let labs = w.lab_ids();
    // bob (in `students`) sees labs[0] through his group, nothing else.
    share_only_the_first(&w, "students");
    // lab-api first, and bob's stream open before anything is synced: what follows comes in
    // the order it was written.
    let (_lab_api, base) = api_for_bob(&f).await;
    system_tests::wait_metric(
        &base,
        "events_change_stream_up",
        &[],
        1.0,
        Duration::from_secs(30),
    )
    .await;
    let open_stream = || async {
        let mut s = SseStream::open(
            &format!("{base}/api/events/stream?event_types=worker.labs.updated"),
            &[("authorization", "Bearer bob-token")],
        )
        .await
        .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));
        assert_eq!(s.expect(Duration::from_secs(10)).await.event, "connected");
        s
    };
    let mut first = open_stream().await;
    let d = f.spawn(
        "daemon",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__ACCESS_INTERVAL", "2s"),
        ],
    );
    // bob had no user anywhere: nothing of the first sync reaches him but the news that his
    // accounts changed, after which his stream ends.
    let frames = first
        .until(Duration::from_secs(60), |f| {
            f.iter().any(|f| f.event == "reset")
        })
        .await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].data()["reason"], "access_changed");
    assert_eq!(first.next(Duration::from_secs(10)).await, Err(Next::Ended));
    let api = Api {
        base: base.clone(),
        http: reqwest::Client::new(),
    };
    let bobs = || api.labs_of(&w.id, "bob");
    let until = |want: Vec<String>| {
        let bobs = &bobs;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let got = bobs().await;
                if got == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bob sees {got:?}, not {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until(vec![labs[0].clone()]).await;
    let mut stream = open_stream().await;

    // The share withdrawn on CML: gone for bob, and his stream says so without a field.
    let revoked_at = std::time::Instant::now();
    w.update_lab_quietly(&labs[0], |l| l.groups = Vec::new());
    until(Vec::new()).await;
    let took = revoked_at.elapsed();
    // The stream may first carry the lab's creation, when lab-api's change stream brought it
    // after the stream opened (the record was readable before): an addition, then the removal.
    let frames = stream
        .until(Duration::from_secs(30), |f| {
            f.last().is_some_and(|f| f.data()["action"] == "removed")
        })
        .await;
    for earlier in &frames[..frames.len() - 1] {
        assert_eq!(
            earlier.data()["action"],
            "created",
            "{:?}",
            earlier.envelope
        );
        assert_eq!(earlier.data()["lab_id"], labs[0].as_str());
    }
    let data = frames[frames.len() - 1].data();
    assert_eq!(data["action"], "removed", "{data}");
    assert_eq!(data["reason"], "access");
    assert_eq!(data["lab_id"], labs[0].as_str());
    assert!(data.get("title").is_none(), "nothing of the lab: {data}");
    assert!(
        d.events("worker_synced")
            .iter()
            .any(|l| l["source"] == "access"),
        "read by an access sync, not a cycle"
    );
    assert!(f
        .status(&w.id)
        .await
        .get_datetime("last_access_read_at")
        .is_ok());

    // A group joined: its labs show, and arrive in the stream... as a reset: bob's accounts
    // changed, so his stream ends and he reloads.
    w.directory(|d| {
        let id = d.by_name("bob").map(|u| u.id.clone()).expect("bob");
        let netops = d
            .group_by_name("netops")
            .map(|g| g.id.clone())
            .expect("netops");
        d.users.get_mut(&id).expect("bob").groups.insert(netops);
    });
    let netops = SimGroup {
        id: w.group_named("netops"),
        name: "netops".into(),
        permissions: vec!["lab_exec".into()],
    };
    w.update_lab_quietly(&labs[1], |l| l.groups = vec![netops]);
    until(vec![labs[1].clone()]).await;
    let frames = stream
        .until(Duration::from_secs(30), |f| {
            f.iter().any(|f| f.event == "reset")
        })
        .await;
    let reset = frames.last().expect("reset");
    assert_eq!(
        reset.data()["reason"],
        "access_changed",
        "{:?}",
        reset.envelope
    );
    assert_eq!(stream.next(Duration::from_secs(10)).await, Err(Next::Ended));
    println!("a withdrawn share stopped showing {took:?} after it was withdrawn (sync.access_interval = 2s)");
    d.signal(libc::SIGTERM);
}

/// On CML 2.9+, a message of the server's event stream saying a user or a group changed has
/// its users and groups read again at once (the access interval and the cycle are far away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_or_group_event_reads_who_may_see_what_again() {
    let f = Fixture::new("access_event", 3, 3).await;
    let w = f.fleet.fleet.workers[2].clone();
    assert!(w.has_event_stream());
    let labs = w.lab_ids();
    let netops = share_only_the_first(&w, "netops");
    let d = f.spawn(
        "daemon",
        &[
            ("CML_LABS_SYNC__INTERVAL", "1h"),
            ("CML_LABS_SYNC__EVENTS__ENABLED", "true"),
        ],
    );
    let (_lab_api, base) = api_for_bob(&f).await;
    let api = Api {
        base,
        http: reqwest::Client::new(),
    };
    d.wait_event("cycle_completed", 1, Duration::from_secs(60))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while w.listening_streams() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never followed the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bobs = || api.labs_of(&w.id, "bob");
    assert!(
        bobs().await.is_empty(),
        "bob is in no group that sees a lab"
    );
    // bob joins netops, and the server says so on its stream.
    let bob_id = w.directory(|d| {
        let id = d.by_name("bob").map(|u| u.id.clone()).expect("bob");
        d.users
            .get_mut(&id)
            .expect("bob")
            .groups
            .insert(netops.id.clone());
        id
    });
    w.announce_access("group", "modified", &bob_id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bobs().await != vec![labs[0].clone()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob never saw the lab: {:?}",
            bobs().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let access: Vec<_> = d
        .events("worker_synced")
        .into_iter()
        .filter(|l| l["source"] == "access")
        .collect();
    assert_eq!(access.len(), 1, "one read of users and groups: {access:?}");
    assert_eq!(access[0]["worker_id"], w.id.as_str());
    assert_eq!(access[0]["cml_calls"], 2, "users and groups, nothing else");
}
