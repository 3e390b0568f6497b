//! Whether a plugin library may be loaded at all, judged from the file system alone, the
//! way ssh judges a private key: loading a library runs its code as the user.
//!
//! Owns: the rule. The library file (symlinks resolved) and the directory it lies in must
//! be owned by the user or by root, and neither may be writable by group or others (a
//! world-writable directory with the sticky bit, like `/tmp`, is accepted for the
//! directory: others cannot replace a file they do not own there). Anyone who can write
//! the file, or replace it in its directory, could otherwise make the runner execute their
//! code. Must not: open or load the library.

use std::path::Path;

/// `Ok` when `path` may be loaded; otherwise the reason and the fix, in one line.
pub fn check(path: &Path) -> Result<(), String> {
    imp::check(path)
}

#[cfg(unix)]
mod imp {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    const STICKY: u32 = 0o1000;

    pub(super) fn check(path: &Path) -> Result<(), String> {
        let real = path
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let file = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", real.display()))?;
        judge(&real, "library", file.uid(), file.mode(), me, false)?;
        if let Some(dir) = real.parent() {
            let d = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            judge(dir, "directory", d.uid(), d.mode(), me, true)?;
        }
        Ok(())
    }

    /// The rule for one file or directory; `shown` is what the message names.
    pub(super) fn judge(
        shown: &Path,
        what: &str,
        uid: u32,
        mode: u32,
        me: u32,
        is_dir: bool,
    ) -> Result<(), String> {
        let shown = shown.display();
        if uid != me && uid != 0 {
            return Err(format!(
                "refusing to load a plugin whose {what} {shown} is owned by another user (uid {uid}; you are uid {me}): anyone who owns it can run code as you. Fix: copy the plugin to a directory of your own, or have root own it"
            ));
        }
        let loose = mode & 0o022;
        let sticky_dir = is_dir && mode & STICKY != 0 && mode & 0o002 != 0;
        if loose != 0 && !sticky_dir {
            let who = match (loose & 0o020 != 0, loose & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "its group",
                _ => "others",
            };
            return Err(format!(
                "refusing to load a plugin whose {what} {shown} is writable by {who} (mode {:04o}): anyone who can write it can run code as you. Fix: chmod go-w {shown}",
                mode & 0o7777
            ));
        }
        Ok(())
    }
}

#[cfg(not(unix))]
mod imp {
    use std::path::Path;

    /// No owner or mode bits to judge: the library must exist.
    pub(super) fn check(path: &Path) -> Result<(), String> {
        std::fs::metadata(path)
            .map(drop)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::imp::judge;
    use std::path::Path;

    #[test]
    fn the_rule_is_sshs() {
        let p = Path::new("/x/libp.so");
        assert!(judge(p, "library", 1000, 0o100755, 1000, false).is_ok());
        assert!(
            judge(p, "library", 0, 0o100755, 1000, false).is_ok(),
            "root's"
        );
        let e = judge(p, "library", 1001, 0o100755, 1000, false).unwrap_err();
        assert!(
            e.contains("owned by another user (uid 1001") && e.contains("Fix"),
            "{e}"
        );
        let e = judge(p, "library", 1000, 0o100775, 1000, false).unwrap_err();
        assert!(
            e.contains("writable by its group") && e.contains("chmod go-w /x/libp.so"),
            "{e}"
        );
        let e = judge(p, "library", 1000, 0o100757, 1000, false).unwrap_err();
        assert!(e.contains("writable by others"), "{e}");
        // /tmp: world-writable with the sticky bit is fine for a directory, not a file.
        assert!(judge(Path::new("/tmp"), "directory", 0, 0o41777, 1000, true).is_ok());
        assert!(judge(p, "library", 1000, 0o101777, 1000, false).is_err());
        assert!(judge(Path::new("/d"), "directory", 1000, 0o40777, 1000, true).is_err());
    }
}
