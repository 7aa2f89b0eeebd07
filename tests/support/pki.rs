//! A registry as CI has a private one: TLS with a CA of the test's own and
//! htpasswd basic auth, and the Docker `config.json` that logs in to it.
use std::path::PathBuf;
use std::process::Command;

use super::{run_ok, Registry, Security};

/// TLS material and users for a private registry, in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// made with openssl, and an htpasswd file with `user`.
    pub fn new(user: &str, password: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sh = format!(
            "set -e; cd {d}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=kiln-test-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=kiln-ci 2>/dev/null
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext 2>/dev/null
mkdir certs && cp ca.pem certs/ca.crt
htpasswd -Bbn {user} {password} > htpasswd",
            d = d.display()
        );
        run_ok(Command::new("sh").arg("-c").arg(sh));
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A registry serving TLS with this server certificate and requiring
    /// this htpasswd user, and with `client_certs` a client certificate
    /// from this CA too.
    pub fn start_registry(&self, client_certs: bool) -> Registry {
        let ca = self.path("ca.pem");
        Registry::start_secure(&Security {
            cert: &self.path("server.pem"),
            key: &self.path("server.key"),
            htpasswd: &self.path("htpasswd"),
            client_ca: client_certs.then_some(ca.as_path()),
        })
    }
}

pub fn docker_config(json: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), json).unwrap();
    dir
}

pub fn base64(s: &str) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s '{s}' | base64 -w0")),
    );
    String::from_utf8(out.stdout).unwrap()
}
