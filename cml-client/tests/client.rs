//! The CML client against the simulator: payload mapping of every version, faults, tokens, TLS.

mod common;

use common::{config, target};

use std::time::Duration;

use cml_client::{AccessRead, CmlClient, Error, FetchSource, GroupsRead};
use cml_sim::{
    Addressing, EndpointFault, Faults, FleetConfig, Personality, RunningFleet, ServeOptions,
    SimGroup, SimShare,
};
use shared::{
    access::{grant, readers, Identity},
    change::Listing,
    config::CmlConfig,
    duration::HumanDuration,
    secret::Secret,
};

async fn fleet(
    workers: usize,
    labs: usize,
    personalities: Vec<Personality>,
    opts: ServeOptions,
) -> RunningFleet {
    let cfg = FleetConfig {
        workers,
        labs_per_worker: labs,
        seed: 42,
        personalities,
        ..FleetConfig::default()
    };
    cml_sim::start(&cfg, &opts).await.expect("simulator starts")
}

#[tokio::test]
async fn every_version_maps_to_the_same_records() {
    let f = fleet(3, 6, Personality::ALL.to_vec(), ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    for i in 0..3 {
        let worker = &f.fleet.workers[i];
        let listing = client.fetch_labs(&target(&f, i)).await.expect("fetch");
        assert_eq!(
            listing.source,
            FetchSource::Bulk,
            "{:?}",
            worker.personality
        );
        assert_eq!(listing.listing, Listing::Complete);
        assert_eq!(
            listing.calls, 4,
            "authenticate + populate_lab_tiles + users + groups"
        );
        assert_eq!(listing.groups, GroupsRead::Associations);
        let AccessRead::Read(dir) = &listing.access else {
            panic!(
                "{:?}: access unread: {:?}",
                worker.personality, listing.access
            );
        };
        assert_eq!(dir.users.len(), 4, "the seeded users");
        let mut expected = worker.labs();
        expected.sort_by(|a, b| a.id.cmp(&b.id));
        let mut got = listing.labs.clone();
        got.sort_by(|a, b| a.lab_id.cmp(&b.lab_id));
        assert_eq!(got.len(), expected.len());
        for (lab, sim) in got.iter().zip(&expected) {
            assert_eq!(lab.lab_id, sim.id);
            assert_eq!(lab.fields.title, sim.title);
            assert_eq!(lab.fields.state, sim.state);
            assert_eq!(lab.fields.notes, sim.notes);
            assert_eq!(lab.fields.owner_username, sim.owner.username);
            assert_eq!(lab.fields.node_count as u32, sim.node_count);
            assert_eq!(lab.fields.link_count as u32, sim.link_count);
            assert_eq!(
                lab.fields.cml_created_at.map(|d| d.timestamp_millis()),
                Some(sim.created.timestamp_millis())
            );
            assert_eq!(
                lab.fields.groups,
                sim.group_names(),
                "{:?}",
                worker.personality
            );
            match worker.personality {
                Personality::V2_4 => {
                    assert_eq!(lab.fields.owner_fullname, "", "2.4 has no owner_fullname");
                }
                _ => assert_eq!(lab.fields.owner_fullname, sim.owner.fullname),
            }
        }
    }
}

#[tokio::test]
async fn tokens_are_reused_and_an_expired_one_costs_one_reauthentication() {
    let f = fleet(1, 3, vec![Personality::V2_9], ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    let w = &f.fleet.workers[0];
    client.fetch_labs(&target(&f, 0)).await.expect("first");
    client.fetch_labs(&target(&f, 0)).await.expect("second");
    assert_eq!(
        w.calls().get("authenticate"),
        Some(&1),
        "the token is cached across cycles"
    );
    w.expire_tokens();
    let listing = client
        .fetch_labs(&target(&f, 0))
        .await
        .expect("after expiry");
    assert_eq!(listing.labs.len(), 3);
    assert_eq!(
        w.calls().get("authenticate"),
        Some(&2),
        "exactly one re-authentication"
    );
    assert_eq!(
        w.calls().get("populate_lab_tiles"),
        Some(&4),
        "the refused call was retried once"
    );
}

#[tokio::test]
async fn wrong_credentials_are_their_own_error() {
    let f = fleet(1, 1, vec![Personality::V2_10], ServeOptions::default()).await;
    let cfg = CmlConfig {
        password: Secret::new("not-the-password-7f3a"),
        ..config()
    };
    let err = CmlClient::new(&cfg)
        .expect("client")
        .fetch_labs(&target(&f, 0))
        .await
        .expect_err("403");
    assert!(matches!(err, Error::AuthFailed { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("not-the-password-7f3a"),
        "the password never appears: {err}"
    );
}

#[tokio::test]
async fn a_missing_bulk_endpoint_falls_back_to_one_call_per_lab() {
    let f = fleet(1, 7, vec![Personality::V2_4], ServeOptions::default()).await;
    let w = &f.fleet.workers[0];
    w.set_faults(Faults {
        bulk_missing: true,
        ..Faults::default()
    });
    let listing = CmlClient::new(&config())
        .expect("client")
        .fetch_labs(&target(&f, 0))
        .await
        .expect("fallback");
    assert_eq!(listing.source, FetchSource::Fallback);
    assert_eq!(listing.listing, Listing::Complete);
    assert_eq!(listing.labs.len(), 7);
    assert_eq!(
        listing.calls,
        1 + 1 + 1 + 7 + 2,
        "auth, tiles (404), labs, 7 details, users, groups"
    );
    assert_eq!(w.calls().get("lab"), Some(&7));
}

/// Waits (up to 10 s) until the simulator has no client connection open.
async fn until_no_connection_is_open(f: &RunningFleet) -> usize {
    for _ in 0..200 {
        if f.fleet.open_connections() == 0 {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.fleet.open_connections()
}

#[tokio::test]
async fn a_sync_reuses_its_connection_and_leaves_nothing_open() {
    let f = fleet(4, 7, vec![Personality::V2_10], ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    for i in 0..3 {
        let listing = client.fetch_labs(&target(&f, i)).await.expect("fetch");
        assert_eq!(
            listing.calls, 4,
            "login, populate_lab_tiles, users and groups"
        );
        assert_eq!(
            until_no_connection_is_open(&f).await,
            0,
            "worker {i}: the connections outlived their sync"
        );
    }
    // Tiles, users and groups are read at the same time: a connection each at most.
    let opened = f.fleet.accepted_connections();
    assert!(
        (3..=9).contains(&opened),
        "three syncs took {opened} connections"
    );
    f.fleet.workers[3].set_faults(Faults {
        bulk_missing: true,
        ..Faults::default()
    });
    let before = f.fleet.accepted_connections();
    let listing = client.fetch_labs(&target(&f, 3)).await.expect("fallback");
    assert_eq!(listing.calls, 1 + 1 + 1 + 7 + 2);
    assert_eq!(listing.groups, GroupsRead::Associations);
    let opened = f.fleet.accepted_connections() - before;
    assert!(
        (1..=3 + config().fallback_concurrency as u64).contains(&opened),
        "12 calls of the fallback took {opened} connections"
    );
    assert_eq!(until_no_connection_is_open(&f).await, 0);
}

#[tokio::test]
async fn the_fleet_latency_delays_every_call() {
    let cfg = FleetConfig {
        workers: 1,
        labs_per_worker: 2,
        latency: Duration::from_millis(300),
        ..FleetConfig::default()
    };
    let f = cml_sim::start(&cfg, &ServeOptions::default())
        .await
        .expect("simulator");
    let client = CmlClient::new(&config()).expect("client");
    let started = std::time::Instant::now();
    let listing = client.fetch_labs(&target(&f, 0)).await.expect("fetch");
    assert_eq!(
        listing.calls, 4,
        "login, then tiles, users and groups at once"
    );
    // A lower bound only: sleeping never ends early, however loaded the machine.
    assert!(started.elapsed() >= Duration::from_millis(600));
}

#[tokio::test]
async fn a_lab_that_vanished_before_its_details_is_gone_not_an_error() {
    let f = fleet(1, 3, vec![Personality::V2_9], ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    let t = target(&f, 0);
    let w = &f.fleet.workers[0];
    let gone = w.lab_ids()[0].clone();
    assert!(client
        .lab_details(&t, &gone)
        .await
        .expect("details")
        .is_some());
    w.delete_lab(&gone);
    assert!(client
        .lab_details(&t, &gone)
        .await
        .expect("404 is not an error")
        .is_none());
    assert_eq!(client.list_lab_ids(&t).await.expect("ids").len(), 2);
    let info = client
        .system_information(&t)
        .await
        .expect("system_information");
    assert_eq!((info.version.as_str(), info.ready), ("2.9.1+build.7", true));
}

/// Whether an error is of the kind a fault should cause.
type ErrorCheck = fn(&Error) -> bool;

#[tokio::test]
async fn every_fault_gives_its_error_kind() {
    let f = fleet(1, 4, vec![Personality::V2_10], ServeOptions::default()).await;
    let w = &f.fleet.workers[0];
    let quick = CmlConfig {
        request_timeout: HumanDuration(Duration::from_millis(400)),
        ..config()
    };
    let client = CmlClient::new(&quick).expect("client");
    let t = target(&f, 0);
    // Authenticate once with no faults, so each fault hits the data calls.
    client.fetch_labs(&t).await.expect("healthy");

    let cases: Vec<(&str, Faults, ErrorCheck)> = vec![
        (
            "latency past the timeout",
            Faults {
                latency_ms: 1500,
                ..Faults::default()
            },
            |e| matches!(e, Error::Timeout { .. }),
        ),
        (
            "hang",
            Faults {
                hang: true,
                ..Faults::default()
            },
            |e| matches!(e, Error::Timeout { .. }),
        ),
        (
            "reset",
            Faults {
                reset: true,
                ..Faults::default()
            },
            |e| matches!(e, Error::Unreachable { .. }),
        ),
        (
            "always 503",
            Faults {
                error_rate: 1.0,
                error_statuses: vec![503],
                ..Faults::default()
            },
            |e| matches!(e, Error::Status { status: 503, .. }),
        ),
        (
            "malformed JSON",
            Faults {
                malformed_json: true,
                ..Faults::default()
            },
            |e| matches!(e, Error::Malformed { .. }),
        ),
        (
            "truncated body",
            Faults {
                truncated_body: true,
                ..Faults::default()
            },
            |e| matches!(e, Error::Malformed { .. }),
        ),
        (
            "no bulk and labs 404",
            Faults {
                bulk_missing: true,
                labs_list_404: true,
                ..Faults::default()
            },
            |e| matches!(e, Error::Status { status: 404, .. }),
        ),
    ];
    for (name, faults, expected) in cases {
        w.set_faults(faults);
        let err = client.fetch_labs(&t).await.expect_err(name);
        assert!(expected(&err), "{name}: {err:?}");
        w.set_faults(Faults::default());
        assert_eq!(
            client.fetch_labs(&t).await.expect("recovers").labs.len(),
            4,
            "{name}: recovers"
        );
    }

    // A 404 on the listing alone does not matter while the bulk call works.
    w.set_faults(Faults {
        labs_list_404: true,
        ..Faults::default()
    });
    assert_eq!(
        client.fetch_labs(&t).await.expect("bulk works").listing,
        Listing::Complete
    );
}

#[tokio::test]
async fn failing_detail_calls_make_the_listing_partial() {
    let f = fleet(1, 30, vec![Personality::V2_9], ServeOptions::default()).await;
    let w = &f.fleet.workers[0];
    let client = CmlClient::new(&config()).expect("client");
    let t = target(&f, 0);
    client.fetch_labs(&t).await.expect("healthy");
    // Every call fails half the time; retry until the listing itself succeeds.
    w.set_faults(Faults {
        bulk_missing: true,
        error_rate: 0.3,
        error_statuses: vec![500],
        ..Faults::default()
    });
    let mut partial = None;
    for _ in 0..20 {
        if let Ok(l) = client.fetch_labs(&t).await {
            if l.listing == Listing::Partial {
                partial = Some(l);
                break;
            }
        }
    }
    let l = partial.expect("some detail calls failed in 20 tries");
    assert!(l.labs.len() < 30);
    assert!(
        l.note
            .as_deref()
            .is_some_and(|n| n.contains("detail calls failed")),
        "{:?}",
        l.note
    );
}

#[tokio::test]
async fn path_prefix_addressing_works() {
    let opts = ServeOptions {
        addressing: Addressing::Prefix,
        ..ServeOptions::default()
    };
    let f = fleet(3, 2, Personality::ALL.to_vec(), opts).await;
    let client = CmlClient::new(&config()).expect("client");
    for i in 0..3 {
        let t = target(&f, i);
        assert!(t.endpoint.contains("/w/"), "{}", t.endpoint);
        assert_eq!(client.fetch_labs(&t).await.expect("fetch").labs.len(), 2);
    }
}

#[tokio::test]
async fn tls_is_verified_by_default_and_can_use_a_ca_bundle_or_be_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ServeOptions {
        tls: true,
        state_dir: Some(dir.path().to_owned()),
        ..ServeOptions::default()
    };
    let f = fleet(1, 2, vec![Personality::V2_10], opts).await;
    let t = target(&f, 0);
    assert!(t.endpoint.starts_with("https://"));

    let err = CmlClient::new(&config())
        .expect("client")
        .fetch_labs(&t)
        .await
        .expect_err("self-signed");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");

    let ca = f
        .ca_path
        .clone()
        .expect("CA written")
        .to_string_lossy()
        .into_owned();
    let with_ca = CmlConfig {
        ca_bundle: ca,
        ..config()
    };
    assert_eq!(
        CmlClient::new(&with_ca)
            .expect("client")
            .fetch_labs(&t)
            .await
            .expect("trusted")
            .labs
            .len(),
        2
    );

    let insecure = CmlConfig {
        verify_tls: false,
        ..config()
    };
    assert_eq!(
        CmlClient::new(&insecure)
            .expect("client")
            .fetch_labs(&t)
            .await
            .expect("unverified")
            .labs
            .len(),
        2
    );
}

#[tokio::test]
async fn tokens_expire_by_themselves_too() {
    let cfg = FleetConfig {
        workers: 1,
        labs_per_worker: 2,
        seed: 3,
        token_ttl: Duration::from_secs(1),
        ..FleetConfig::default()
    };
    let f = cml_sim::start(&cfg, &ServeOptions::default())
        .await
        .expect("simulator");
    let client = CmlClient::new(&config()).expect("client");
    client.fetch_labs(&target(&f, 0)).await.expect("first");
    // The simulator's clock moves past the token's lifetime; nobody waits for it.
    f.fleet.advance_clock(Duration::from_secs(2));
    client
        .fetch_labs(&target(&f, 0))
        .await
        .expect("after the token's lifetime");
    assert_eq!(f.fleet.workers[0].calls().get("authenticate"), Some(&2));
}

#[tokio::test]
async fn redirects_are_never_followed_so_the_password_stays_home() {
    // What a thief would answer: plausible labs.
    let other =
        testkit::origin::Origin::start(serde_json::json!({"lab_tiles": {"stolen": {}}})).await;
    let elsewhere = &other.url;
    let f = fleet(2, 2, vec![Personality::V2_10], ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    f.fleet.workers[0].set_faults(Faults {
        redirect_login_to: Some(format!("{elsewhere}/api/v0/authenticate")),
        ..Faults::default()
    });
    let err = client
        .fetch_labs(&target(&f, 0))
        .await
        .expect_err("redirected");
    assert_eq!(err.metric_label(), "cml_redirect", "{err}");
    assert!(err.to_string().contains("307"), "{err}");
    // A redirect of the labs listing is not taken as the worker's labs either.
    client
        .fetch_labs(&target(&f, 1))
        .await
        .expect("logs in first");
    f.fleet.workers[1].set_faults(Faults {
        redirect_tiles_to: Some(format!("{elsewhere}/api/v0/populate_lab_tiles")),
        ..Faults::default()
    });
    let err = client
        .fetch_labs(&target(&f, 1))
        .await
        .expect_err("redirected");
    assert_eq!(err.metric_label(), "cml_redirect", "{err}");
    assert_eq!(
        other.requests(),
        Vec::<String>::new(),
        "nothing reached the other origin"
    );
}

#[tokio::test]
async fn a_body_past_the_limit_fails_the_worker_while_it_streams() {
    let f = fleet(1, 3, vec![Personality::V2_9], ServeOptions::default()).await;
    let client = CmlClient::new(&CmlConfig {
        max_response_bytes: 1024 * 1024,
        ..config()
    })
    .expect("client");
    client
        .fetch_labs(&target(&f, 0))
        .await
        .expect("small enough");
    f.fleet.workers[0].set_faults(Faults {
        tiles_padding_bytes: 50 * 1024 * 1024,
        ..Faults::default()
    });
    let err = client
        .fetch_labs(&target(&f, 0))
        .await
        .expect_err("too large");
    assert_eq!(err.metric_label(), "cml_too_large", "{err}");
    assert_eq!(
        f.fleet.workers[0].calls().get("labs"),
        None,
        "no fallback after a body too large"
    );
}

#[tokio::test]
async fn more_labs_than_the_cap_fail_the_worker() {
    let f = fleet(1, 30, vec![Personality::V2_10], ServeOptions::default()).await;
    let client = CmlClient::new(&CmlConfig {
        max_labs_per_worker: 20,
        ..config()
    })
    .expect("client");
    let err = client
        .fetch_labs(&target(&f, 0))
        .await
        .expect_err("too many");
    assert_eq!(err.metric_label(), "cml_too_many_labs", "{err}");
    // The fallback's id list is held to the same cap.
    f.fleet.workers[0].set_faults(Faults {
        bulk_missing: true,
        ..Faults::default()
    });
    let err = client
        .fetch_labs(&target(&f, 0))
        .await
        .expect_err("too many");
    assert_eq!(err.metric_label(), "cml_too_many_labs", "{err}");
}

#[tokio::test]
async fn text_from_a_cml_server_in_errors_is_clipped() {
    let f = fleet(1, 1, vec![Personality::V2_9], ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    f.fleet.workers[0].set_faults(Faults {
        error_rate: 1.0,
        error_statuses: vec![500],
        error_description_bytes: 5 * 1024 * 1024,
        ..Faults::default()
    });
    let err = client.fetch_labs(&target(&f, 0)).await.expect_err("fails");
    let text = err.to_string();
    assert!(text.len() < 1024, "{} bytes", text.len());
    assert!(text.contains("injected by the simulator"), "{text}");
}

#[tokio::test]
async fn a_lab_shared_with_two_groups_lists_both_on_every_release_with_one_groups_call() {
    let f = fleet(3, 5, Personality::ALL.to_vec(), ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    for (i, w) in f.fleet.workers.iter().enumerate() {
        let lab = w.lab_ids()[0].clone();
        let shared = ["netops", "students"].map(|name| SimGroup {
            id: w.group_named(name),
            name: name.into(),
            permissions: vec!["lab_view".into(), "lab_exec".into()],
        });
        assert!(w.set_lab_groups(&lab, shared.to_vec()));
        w.reset_calls();
        // Every sync reads the server's groups once, whatever the release.
        for sync in 0..3 {
            let listing = client.fetch_labs(&target(&f, i)).await.expect("fetch");
            let got = listing
                .labs
                .iter()
                .find(|l| l.lab_id == lab)
                .expect("listed");
            assert_eq!(
                got.fields.groups,
                ["netops", "students"],
                "{:?}",
                w.personality
            );
            for l in &listing.labs {
                let sim = w.lab(&l.lab_id).expect("sim lab");
                assert_eq!(l.fields.groups, sim.group_names());
            }
            let groups_calls = w.calls().get("groups").copied().unwrap_or(0);
            assert_eq!(listing.groups, GroupsRead::Associations);
            assert_eq!(groups_calls, sync + 1, "{:?}: one per sync", w.personality);
            assert_eq!(w.calls().get("lab_associations"), None, "never one per lab");
        }
    }
}

#[tokio::test]
async fn users_and_groups_read_with_the_labs_say_who_may_see_each_lab() {
    let f = fleet(3, 6, Personality::ALL.to_vec(), ServeOptions::default()).await;
    let client = CmlClient::new(&config()).expect("client");
    for (i, w) in f.fleet.workers.iter().enumerate() {
        let labs = w.lab_ids();
        // bob owns the first; netops (alice, carol) views the second; dave, made now, the third.
        let bob = w
            .directory(|d| d.by_name("bob").map(|u| u.as_owner()))
            .expect("bob");
        w.update_lab(&labs[0], |l| l.owner = bob);
        for l in &labs {
            w.set_lab_groups(l, Vec::new());
        }
        let netops = SimGroup {
            id: w.group_named("netops"),
            name: "netops".into(),
            permissions: vec!["lab_view".into()],
        };
        w.set_lab_groups(&labs[1], vec![netops]);
        let dave = w
            .directory(|d| d.add_user("dave", "pw", "", false, Default::default()))
            .expect("dave");
        w.update_lab_quietly(&labs[2], |l| {
            l.user_shares = vec![SimShare {
                id: dave.id.clone(),
                permissions: vec!["lab_exec".into()],
            }]
        });
        let listing = client.fetch_labs(&target(&f, i)).await.expect("fetch");
        let AccessRead::Read(dir) = &listing.access else {
            panic!("unread: {:?}", listing.access);
        };
        let shares = dir.shares(&w.id);
        let accounts = dir.accounts(&w.id);
        for name in ["admin", "alice", "bob", "carol", "dave", "nobody"] {
            let who = Identity {
                username: name.into(),
                fleet_admin: false,
            };
            let g = grant(&who, &accounts);
            let seen: Vec<String> = listing
                .labs
                .iter()
                .filter(|l| {
                    let s = shares.get(&l.lab_id).map_or(&[][..], Vec::as_slice);
                    g.sees(&w.id, &readers(&w.id, &l.fields.owner_username, s))
                })
                .map(|l| l.lab_id.clone())
                .collect();
            let user = w.directory(|d| d.by_name(name).map(|u| u.id.clone()));
            let mut cml: Vec<String> = user
                .map(|id| w.labs_visible_to(&id).into_iter().map(|l| l.id).collect())
                .unwrap_or_default();
            let mut seen = seen;
            seen.sort();
            cml.sort();
            assert_eq!(seen, cml, "{:?}: {name}", w.personality);
        }
    }
}

#[tokio::test]
async fn unreadable_groups_leave_every_lab_listed_and_say_why() {
    let f = fleet(1, 4, vec![Personality::V2_9], ServeOptions::default()).await;
    let w = &f.fleet.workers[0];
    let client = CmlClient::new(&config()).expect("client");
    let faults = [
        (EndpointFault::Status(403), "cml_http_status", "403"),
        (EndpointFault::Status(404), "cml_http_status", "404"),
        (EndpointFault::Status(500), "cml_http_status", "500"),
        (EndpointFault::Status(503), "cml_http_status", "503"),
        (EndpointFault::Malformed, "cml_malformed", "not JSON"),
    ];
    for (fault, kind, says) in faults {
        w.set_faults(Faults {
            endpoint_faults: [("groups".to_owned(), fault.clone())].into(),
            ..Faults::default()
        });
        let listing = client
            .fetch_labs(&target(&f, 0))
            .await
            .expect("labs are read");
        assert_eq!(listing.listing, Listing::Complete, "{fault:?}");
        assert_eq!(listing.labs.len(), 4);
        assert!(listing.labs.iter().all(|l| l.fields.groups.is_empty()));
        match &listing.groups {
            GroupsRead::Unread { kind: k, error } => {
                assert_eq!(*k, kind, "{fault:?}");
                assert!(error.contains(says), "{fault:?}: {error}");
                assert!(error.contains("groups"), "{error}");
            }
            other => panic!("{fault:?}: {other:?}"),
        }
    }
    // A body past the limit and a server that never answers are unread groups too.
    let small = CmlClient::new(&CmlConfig {
        max_response_bytes: w.tiles_body().len() + 1024,
        ..config()
    })
    .expect("client");
    let many: Vec<SimGroup> = (0..200)
        .map(|i| {
            let name = format!("a-rather-long-group-name-{i:04}");
            SimGroup {
                id: w.group_named(&name),
                name,
                permissions: vec!["lab_view".into()],
            }
        })
        .collect();
    w.set_faults(Faults::default());
    assert!(w.set_lab_groups(&w.lab_ids()[0], many));
    let listing = small.fetch_labs(&target(&f, 0)).await.expect("labs fit");
    assert!(
        matches!(
            listing.groups,
            GroupsRead::Unread {
                kind: "cml_too_large",
                ..
            }
        ),
        "{:?}",
        listing.groups
    );
    w.set_faults(Faults {
        hold_endpoint: Some("groups".into()),
        ..Faults::default()
    });
    let quick = CmlClient::new(&CmlConfig {
        request_timeout: HumanDuration(Duration::from_millis(300)),
        ..config()
    })
    .expect("client");
    let listing = quick
        .fetch_labs(&target(&f, 0))
        .await
        .expect("labs are read");
    assert!(
        matches!(
            listing.groups,
            GroupsRead::Unread {
                kind: "cml_timeout",
                ..
            }
        ),
        "{:?}",
        listing.groups
    );
    w.set_faults(Faults::default());
    let listing = client.fetch_labs(&target(&f, 0)).await.expect("healthy");
    assert_eq!(listing.groups, GroupsRead::Associations);
}
