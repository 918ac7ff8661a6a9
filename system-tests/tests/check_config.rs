//! `check-config` of both binaries, run as real processes against the MongoDB stand-in.

use std::process::Output;

use system_tests::command;

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(name);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run binary")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const API_NO_AUTH: (&str, &str) = ("CML_LABS_API__AUTH__MODE", "none");
const CML_PASSWORD: (&str, &str) = ("CML_LABS_CML__PASSWORD", "supersecret-pw");

#[test]
fn both_binaries_reach_the_server_with_a_valid_config() {
    let uri = testkit::mongodb_uri();
    let out = run(
        "sync-daemon",
        &["check-config"],
        &[("CML_LABS_MONGODB__URI", &uri), CML_PASSWORD],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("answers"), "{}", text(&out));
    let out = run(
        "lab-api",
        &["check-config"],
        &[("CML_LABS_MONGODB__URI", &uri), API_NO_AUTH],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn an_invalid_env_value_exits_78_naming_key_and_variable() {
    let out = run(
        "sync-daemon",
        &["check-config", "--offline"],
        &[("CML_LABS_SYNC__CONCURRENCY", "lots"), CML_PASSWORD],
    );
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("sync.concurrency") && t.contains("CML_LABS_SYNC__CONCURRENCY"),
        "{t}"
    );
}

#[test]
fn an_unknown_key_in_the_file_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("labs.toml");
    std::fs::write(&path, "[sync]\nconcurency = 4\n").expect("write");
    let out = run(
        "sync-daemon",
        &[
            "--config",
            path.to_str().expect("utf-8"),
            "check-config",
            "--offline",
        ],
        &[CML_PASSWORD],
    );
    assert_eq!(out.status.code(), Some(78));
    let t = text(&out);
    assert!(t.contains("concurency") && t.contains("labs.toml"), "{t}");
}

#[test]
fn secrets_are_never_printed() {
    let uri = "mongodb://labuser:topsecret-mongo@127.0.0.1:9/?serverSelectionTimeoutMS=300";
    let out = run(
        "sync-daemon",
        &["check-config", "--print"],
        &[
            ("CML_LABS_MONGODB__URI", uri),
            CML_PASSWORD,
            ("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms"),
        ],
    );
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(69),
        "nothing listens on port 9: {t}"
    );
    assert!(
        !t.contains("topsecret-mongo") && !t.contains("supersecret-pw"),
        "{t}"
    );
    assert!(
        t.contains("mongodb://***@127.0.0.1:9"),
        "the redacted target is named: {t}"
    );
    assert!(t.contains("[redacted]"), "{t}");
}

/// Passwords with URI separators in them, as typed (wrongly unencoded) or percent-encoded: no
/// form of them reaches the output, whether the URI parses, fails to parse, or points nowhere.
#[test]
fn awkward_passwords_never_show_in_any_output() {
    let passwords = [
        "Mongo/S3CR?et",
        "p@ss:w0rd/x",
        "50%off/now",
        "Mongo%2FS3CR%3Fet",
    ];
    for pw in passwords {
        for uri in [
            format!("mongodb://labuser:{pw}@127.0.0.1:9/?serverSelectionTimeoutMS=300"),
            format!("mongodb://labuser:{pw}"),
            format!("mongodb://labuser:{pw}@"),
        ] {
            for (binary, env) in [("sync-daemon", CML_PASSWORD), ("lab-api", API_NO_AUTH)] {
                let out = run(
                    binary,
                    &["check-config", "--print"],
                    &[
                        ("CML_LABS_MONGODB__URI", &uri),
                        env,
                        ("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms"),
                    ],
                );
                let t = text(&out);
                assert_ne!(out.status.code(), Some(0), "{uri}: nothing answers: {t}");
                let decoded = pw.replace("%2F", "/").replace("%3F", "?");
                for secret in [pw, decoded.as_str(), "S3CR", "w0rd", "off/now"] {
                    assert!(!t.contains(secret), "{binary} {uri} shows {secret}: {t}");
                }
            }
            // A start that fails on the URI (or on the server) says why without it.
            let out = run(
                "sync-daemon",
                &["once"],
                &[
                    ("CML_LABS_MONGODB__URI", &uri),
                    CML_PASSWORD,
                    ("CML_LABS_MONGODB__SERVER_SELECTION_TIMEOUT", "300ms"),
                ],
            );
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "{uri}: {t}");
            for secret in [pw, "S3CR", "w0rd", "off/now"] {
                assert!(!t.contains(secret), "{uri}: start-up shows {secret}: {t}");
            }
        }
    }
}

#[test]
fn the_api_rejects_jwt_mode_without_its_settings() {
    let out = run("lab-api", &["check-config", "--offline"], &[]);
    assert_eq!(out.status.code(), Some(78));
    let t = text(&out);
    assert!(
        t.contains("api.auth.jwks_url") && t.contains("api.auth.issuer"),
        "{t}"
    );
}

#[test]
fn help_and_version_work() {
    for name in ["sync-daemon", "lab-api"] {
        let out = run(name, &["--version"], &[]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{name} ")));
        let out = run(name, &["--help"], &[]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    }
}

#[test]
fn the_example_configuration_lists_only_known_keys() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/example.toml");
    let out = run(
        "sync-daemon",
        &["--config", example, "check-config", "--offline"],
        &[CML_PASSWORD],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "lab-api",
        &["--config", example, "check-config", "--offline"],
        &[API_NO_AUTH],
    );
    assert!(out.status.success(), "{}", text(&out));
}
