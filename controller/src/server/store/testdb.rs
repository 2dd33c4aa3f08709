//! A fresh PostgreSQL database for a test, on the server `scripts/env-up.sh` starts
//! (`FERRY_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5544/postgres`), dropped when
//! the test ends. No server is a failure, never a skip (as with every other real component).

use postgres::{Client, NoTls};

/// The server's admin URL.
pub fn admin_url() -> String {
    std::env::var("FERRY_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5544/postgres".into())
}

pub struct TestDb {
    /// The test database's URL.
    pub url: String,
    pub name: String,
}

/// Run `f` with an admin connection, on a thread of its own (a test may be inside a runtime).
fn admin<R: Send + 'static>(f: impl FnOnce(&mut Client) -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        let url = admin_url();
        let mut c = Client::connect(&url, NoTls).unwrap_or_else(|e| {
            panic!(
                "test infrastructure missing: PostgreSQL at {url} ({e}); \
                 run scripts/env-up.sh (or set FERRY_POSTGRES_URL)"
            )
        });
        f(&mut c)
    })
    .join()
    .unwrap()
}

impl TestDb {
    pub fn create() -> TestDb {
        let name = format!(
            "ferry_test_{}_{:016x}",
            std::process::id(),
            fastrand::u64(..)
        );
        let n = name.clone();
        admin(move |c| c.batch_execute(&format!("CREATE DATABASE {n}")).unwrap());
        let base = admin_url();
        let cut = base.rfind('/').expect("a URL with a database");
        let url = format!("{}/{name}", &base[..cut]);
        TestDb { url, name }
    }

    /// Run SQL in the test database (to set up what a test needs).
    pub fn execute(&self, sql: &str) {
        let (url, sql) = (self.url.clone(), sql.to_string());
        std::thread::spawn(move || {
            Client::connect(&url, NoTls)
                .unwrap()
                .batch_execute(&sql)
                .unwrap()
        })
        .join()
        .unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let n = self.name.clone();
        admin(move |c| {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"));
        });
    }
}
