//! A private Postgres cluster for one test: `initdb` into a directory of its
//! own, on a free port, stopped and deleted when dropped. For what the
//! machine's shared server must not be changed for: a preloaded
//! `pg_stat_statements` (Postgres's own statement counts) and a streaming
//! replica whose replay a test pauses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub struct PgCluster {
    dir: PathBuf,
    pub port: u16,
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("TEST_PG_BINDIR") {
        return dir.into();
    }
    let out = Command::new("pg_config").arg("--bindir").output().expect("pg_config (postgresql) must be installed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A Postgres program, run as the `postgres` user when we are root (initdb
/// refuses to run as root), as ourselves otherwise.
fn command(program: &str) -> Command {
    let path = bindir().join(program);
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if is_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = command(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn fresh_dir(kind: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ugc-test-pg-{kind}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The cluster runs as `postgres`: it must own its directory.
    let _ = Command::new("chown").args(["postgres:postgres"]).arg(&dir).status();
    dir
}

impl PgCluster {
    /// A new primary (superuser `postgres`, trust auth, replication allowed
    /// from loopback), with `pg_stat_statements` preloaded.
    pub fn start() -> Self {
        let dir = fresh_dir("primary");
        let data = dir.join("data");
        run("initdb", &["-D", s(&data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
        let cluster = Self { dir, port: free_port() };
        cluster.launch();
        cluster
    }

    /// A streaming replica of `self` (a `pg_basebackup` of it, following it
    /// from then on).
    pub fn replica(&self) -> Self {
        let dir = fresh_dir("replica");
        let data = dir.join("data");
        run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                s(&data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        let cluster = Self { dir, port: free_port() };
        cluster.launch();
        cluster
    }

    fn launch(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements -c wal_level=replica \
             -c max_wal_senders=4 -c hot_standby=on -c max_connections=60 -c shared_buffers=32MB",
            self.port,
            s(&self.dir)
        );
        run("pg_ctl", &["-D", s(&data), "-o", &options, "-l", s(&self.dir.join("log")), "-w", "-t", "60", "start"]);
    }

    /// Stops the server at once (as a crash would).
    pub fn kill(&self) {
        let data = self.dir.join("data");
        run("pg_ctl", &["-D", s(&data), "-m", "immediate", "-w", "stop"]);
    }

    /// Starts it again after [`PgCluster::kill`].
    pub fn restart(&self) {
        self.launch();
    }

    /// Runs `sql` on database `db` of this cluster, through psql.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-XAtq", &self.url(db), "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("psql: {e}"));
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = command("pg_ctl").args(["-D", s(&data), "-m", "immediate", "-w", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
