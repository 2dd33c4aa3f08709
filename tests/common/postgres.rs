//! A fresh PostgreSQL database per test on the server `scripts/env-up.sh` starts
//! (`FERRY_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5544/postgres`), dropped at the
//! end. No server is a failure, never a skip.

use postgres::{Client, NoTls};

pub fn admin_url() -> String {
    std::env::var("FERRY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5544/postgres".into())
}

pub struct TestDb {
    pub url: String,
    pub name: String,
    /// Dropped with this value (false: another URL of a database someone else owns).
    owned: bool,
}

fn admin(sql: String) {
    std::thread::spawn(move || {
        let url = admin_url();
        let mut c = Client::connect(&url, NoTls).unwrap_or_else(|e| {
            panic!(
                "test infrastructure missing: PostgreSQL at {url} ({e}); run scripts/env-up.sh \
                 (or set FERRY_POSTGRES_URL)"
            )
        });
        c.batch_execute(&sql).unwrap();
    })
    .join()
    .unwrap()
}

impl TestDb {
    pub fn create() -> TestDb {
        let name = format!("ferry_it_{}_{:016x}", std::process::id(), fastrand::u64(..));
        admin(format!("CREATE DATABASE {name}"));
        let base = admin_url();
        let cut = base.rfind('/').expect("a URL with a database");
        TestDb {
            url: format!("{}/{name}", &base[..cut]),
            name,
            owned: true,
        }
    }

    /// The same database reached by another URL (through a proxy); `db` still owns it.
    pub fn alias(db: &TestDb, url: &str) -> TestDb {
        TestDb {
            url: url.to_string(),
            name: db.name.clone(),
            owned: false,
        }
    }

    /// `f` on a connection to this database, on a thread of its own (the blocking client must
    /// not run inside a test's tokio runtime).
    fn with_client<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> R + Send + 'static,
    ) -> R {
        let url = self.url.clone();
        std::thread::spawn(move || f(&mut Client::connect(&url, NoTls).unwrap()))
            .join()
            .unwrap()
    }

    /// Run SQL in this database.
    pub fn execute(&self, sql: &str) {
        let sql = sql.to_string();
        self.with_client(move |c| c.batch_execute(&sql).unwrap())
    }

    /// The first column of every row `sql` returns, as text.
    pub fn query_text(&self, sql: &str) -> Vec<String> {
        let sql = sql.to_string();
        self.with_client(move |c| {
            c.query(sql.as_str(), &[])
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = std::panic::catch_unwind(|| {
            admin(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        });
    }
}
