//! `ferryctl serve` refusing to run, with exit 78 (systemd does not restart a config error) and a
//! message that says why: a broken config, a database from a newer controller, a PostgreSQL
//! password that is wrong; and the password file that is right.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, TestController, TestKeys};

/// `ferryctl serve --config FILE` with FILE as given: (exit code, stderr).
fn serve_once(config: &std::path::Path) -> (i32, String) {
    let mut child = Command::new(common::controller::ferryctl_binary())
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ferryctl serve with a broken config still runs after 20 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A database migrated by a newer controller: `ferryctl serve` refuses it with exit 78 (systemd
/// does not restart into it) and says why; on both stores, and the database is left as it was.
#[test]
fn serve_on_a_newer_schema_exits_78() {
    let broker = Broker::start();
    let keys = TestKeys::new();
    for postgres in [false, true] {
        let mut ctl = if postgres {
            TestController::build_on_postgres(&broker, &keys, "")
        } else {
            TestController::build(&broker, &keys, "")
        };
        // A first run creates the schema; then a "newer controller" migrates it to 99.
        ctl.spawn();
        ctl.terminate();
        match &ctl.db {
            Some(db) => db.execute("INSERT INTO ferry_schema VALUES (99)"),
            None => rusqlite::Connection::open(ctl.data_dir.join("ferry.db"))
                .unwrap()
                .pragma_update(None, "user_version", 99)
                .unwrap(),
        }
        let (code, err) = serve_once(&ctl.config_path);
        assert_eq!(code, 78, "postgres={postgres}: {err}");
        assert!(
            err.contains("schema version 99") && err.contains("newer ferryctl"),
            "postgres={postgres}: {err}"
        );
    }
}

#[test]
fn serve_with_a_broken_config_exits_78() {
    let broker = Broker::start();
    let keys = TestKeys::new();
    let ctl = TestController::build(&broker, &keys, "");
    let good = std::fs::read_to_string(&ctl.config_path).unwrap();

    std::fs::write(&ctl.config_path, format!("bogus = 1\n{good}")).unwrap();
    let (code, err) = serve_once(&ctl.config_path);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("configuration:") && err.contains("unknown field `bogus`"),
        "{err}"
    );

    let missing = good.replace(
        &keys.controller.private_pem.display().to_string(),
        "/nonexistent/controller.key",
    );
    std::fs::write(&ctl.config_path, missing).unwrap();
    let (code, err) = serve_once(&ctl.config_path);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("controller_key"), "{err}");

    std::fs::write(&ctl.token_file, "short\n").unwrap();
    std::fs::write(&ctl.config_path, &good).unwrap();
    let (code, err) = serve_once(&ctl.config_path);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("api_token_file"), "{err}");
    assert!(
        !ctl.data_dir.join("ferry.db").exists(),
        "nothing is created on a bad config"
    );
}

/// `[store] password_file` on a PostgreSQL role that must give its password (env-up's
/// pg_hba.conf): a wrong one is exit 78 with PostgreSQL's reason and no secret in the message;
/// the right one serves.
#[test]
fn serve_on_postgres_with_a_password_file() {
    let broker = Broker::start();
    let keys = TestKeys::new();
    let mut ctl = TestController::build_on_postgres(&broker, &keys, "");
    let db = ctl.db.clone().expect("a PostgreSQL controller");
    let right = "it p@ss:w/rd %42";
    db.execute(&format!(
        "DO $$ BEGIN CREATE ROLE ferry_password_it LOGIN; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
         ALTER ROLE ferry_password_it PASSWORD '{right}'; \
         ALTER DATABASE {} OWNER TO ferry_password_it;",
        db.name
    ));
    let text = std::fs::read_to_string(&ctl.config_path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("url = \"postgres://"))
        .expect("the [store] url")
        .to_string();
    let url = db.url.replacen("postgres@", "ferry_password_it@", 1);
    assert_ne!(url, db.url, "{}", db.url);
    let password_file = ctl.dir().join("db-password");
    std::fs::write(
        &ctl.config_path,
        text.replace(
            &line,
            &format!("url = {url:?}\npassword_file = {password_file:?}"),
        ),
    )
    .unwrap();

    std::fs::write(&password_file, "wrong-password\n").unwrap();
    let (code, err) = serve_once(&ctl.config_path);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong-password"), "{err}");

    std::fs::write(&password_file, format!("{right}\n")).unwrap();
    ctl.spawn();
    let (status, _) = ctl.http_get("/healthz");
    assert_eq!(status, 200, "{}", ctl.log());
    assert!(!ctl.log().contains("p@ss"), "{}", ctl.log());
    let owner =
        db.query_text("SELECT tableowner::text FROM pg_tables WHERE tablename = 'ferry_schema'");
    assert_eq!(owner, vec!["ferry_password_it".to_string()]);
    ctl.terminate();
}
