//! USER and `--chown` specs resolved against the image's own /etc/passwd
//! and /etc/group, read inside the root.
use std::path::Path;

use crate::excerpt::excerpt;
use crate::rootfs::resolve_in_root;

/// A name the image's /etc/passwd or /etc/group does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {}", excerpt(.0))]
    NoUser(String),
    #[error("unable to find group {}", excerpt(.0))]
    NoGroup(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups the user is a member of in /etc/group.
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_in_root(root: &Path, path: &str) -> String {
    resolve_in_root(root, Path::new(path), true)
        .and_then(std::fs::read)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn passwd(root: &Path) -> Vec<PasswdEntry> {
    read_in_root(root, "/etc/passwd")
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"/").to_string(),
            })
        })
        .collect()
}

/// The name `uid` has in the root's /etc/passwd.
pub(crate) fn name_of(root: &Path, uid: u32) -> Option<String> {
    passwd(root)
        .into_iter()
        .find(|e| e.uid == uid)
        .map(|e| e.name)
}

fn groups(root: &Path) -> Vec<GroupEntry> {
    read_in_root(root, "/etc/group")
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn lookup_group(root: &Path, spec: &str) -> Result<u32, UserError> {
    if let Ok(gid) = spec.parse() {
        return Ok(gid);
    }
    groups(root)
        .into_iter()
        .find(|g| g.name == spec)
        .map(|g| g.gid)
        .ok_or_else(|| UserError::NoGroup(spec.to_string()))
}

/// Resolves a USER value (`name`, `uid`, `name:group`, `uid:gid`) the way
/// Docker does for running a process: a numeric uid with no passwd entry
/// runs with gid 0.
pub fn resolve_user(root: &Path, spec: &str) -> Result<Identity, UserError> {
    let spec = if spec.is_empty() { "root" } else { spec };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entries = passwd(root);
    let entry = match user.parse::<u32>() {
        Ok(uid) => entries.into_iter().find(|e| e.uid == uid),
        Err(_) => Some(
            entries
                .into_iter()
                .find(|e| e.name == user)
                .ok_or_else(|| UserError::NoUser(user.to_string()))?,
        ),
    };
    let uid = entry
        .as_ref()
        .map_or_else(|| user.parse().unwrap_or(0), |e| e.uid);
    let gid = match group {
        Some(g) => lookup_group(root, g)?,
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    // Like runc: the primary group, then the groups listing the user.
    let mut groups = vec![gid];
    if let (Some(e), None) = (&entry, group) {
        groups.extend(
            self::groups(root)
                .into_iter()
                .filter(|g| g.members.contains(&e.name) && g.gid != gid)
                .map(|g| g.gid),
        );
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.map_or_else(|| "/".to_string(), |e| e.home),
    })
}

/// Resolves a `--chown` value: names are looked up in the target image; a
/// user without a group gets the user's uid as gid, as Docker documents.
pub fn resolve_chown(root: &Path, spec: &str) -> Result<(u32, u32), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = match user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => passwd(root)
            .into_iter()
            .find(|e| e.name == user)
            .map(|e| e.uid)
            .ok_or_else(|| UserError::NoUser(user.to_string()))?,
    };
    let gid = match group {
        Some(g) => lookup_group(root, g)?,
        None => uid,
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\nwheel:x:10:user\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn users_by_name_and_number() {
        let r = root();
        let u = resolve_user(r.path(), "user").unwrap();
        assert_eq!(
            (u.uid, u.gid, u.groups.clone()),
            (1000, 1000, vec![1000, 10])
        );
        assert_eq!(u.home, "/home/user");
        assert_eq!(resolve_user(r.path(), "1000").unwrap().gid, 1000);
        assert_eq!(resolve_user(r.path(), "4242").unwrap().gid, 0);
        assert_eq!(resolve_user(r.path(), "user:wheel").unwrap().gid, 10);
        assert_eq!(resolve_user(r.path(), "5:7").unwrap().gid, 7);
        assert!(resolve_user(r.path(), "nobody-here").is_err());
        assert_eq!(resolve_user(r.path(), "").unwrap().uid, 0);
    }

    #[test]
    fn chown_defaults_gid_to_uid() {
        let r = root();
        assert_eq!(resolve_chown(r.path(), "user").unwrap(), (1000, 1000));
        assert_eq!(resolve_chown(r.path(), "33").unwrap(), (33, 33));
        assert_eq!(resolve_chown(r.path(), "user:wheel").unwrap(), (1000, 10));
        assert!(resolve_chown(r.path(), "ghost").is_err());
    }
}
