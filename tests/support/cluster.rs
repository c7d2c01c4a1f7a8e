//! A throwaway PostgreSQL cluster for tests that stop, restart or
//! reconfigure the server, so the shared one stays up for the other tests.
//! Owned by the `postgres` OS user when the tests run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::suffix;

pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool as the cluster's owner.
pub fn as_owner(cmd: &Path, args: &[&str]) -> std::process::Output {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    };
    c.args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("run a postgres tool")
}

impl Cluster {
    /// initdb and a logical-replication configuration plus `extra_conf`;
    /// not started yet, so files can be added first ([`Cluster::write`]).
    pub fn init(extra_conf: &str) -> Cluster {
        let bin = PathBuf::from(
            std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("unilog-pg-{}", suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let c = Cluster { dir, bin, port };
        let data = c.data();
        let out = as_owner(
            &c.bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n{extra_conf}\n",
            c.dir.display()
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        // Written as root when run as root: the owner only needs to read it.
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        c
    }

    /// A started cluster with `extra_conf`.
    pub fn start(extra_conf: &str) -> Cluster {
        let c = Cluster::init(extra_conf);
        c.pg_ctl(&["start", "-w", "-t", "60"]);
        c
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Writes a file into the data directory, owned by the cluster's owner
    /// with `mode` (a server key must be 0600).
    pub fn write(&self, name: &str, content: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&path)
                .status();
        }
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let log = self.dir.join("log");
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = as_owner(&self.bin.join("pg_ctl"), &all);
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// A URL as the superuser `postgres` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = as_owner(
            &self.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
