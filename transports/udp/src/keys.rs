//! The gateway's key file: the X25519 private key as 64 hex digits on one line (a `#` line
//! may precede it), readable by the owner only. `fleetgate keygen` writes it, and the public
//! key, which devices pin, beside it as `<path>.pub`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::handshake::{KeyPair, hex, parse_key_hex};

/// Why a key file could not be read or written (the operator's to fix).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("{0}: not a key file (expected 64 hex digits of an X25519 private key)")]
    Format(PathBuf),
    /// Generating a key failed.
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// Reads a key file.
pub fn read(path: &Path) -> Result<KeyPair, KeyFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    let private =
        line.and_then(parse_key_hex).ok_or_else(|| KeyFileError::Format(path.to_owned()))?;
    Ok(KeyPair::from_private(private))
}

/// Generates a key pair and writes it to `path` (mode 0600, never over an existing file) and
/// the public key to `<path>.pub`.
pub fn generate(path: &Path) -> Result<KeyPair, KeyFileError> {
    let keys = KeyPair::generate().map_err(|e| KeyFileError::Random(e.to_string()))?;
    let io = |source| KeyFileError::Io { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io)?;
    writeln!(
        file,
        "# fleetgate FGU/1 gateway private key (X25519); public key {}",
        hex(&keys.public)
    )
    .map_err(io)?;
    writeln!(file, "{}", hex(&keys.private)).map_err(io)?;
    let public = public_path(path);
    std::fs::write(&public, format!("{}\n", hex(&keys.public)))
        .map_err(|source| KeyFileError::Io { path: public.clone(), source })?;
    Ok(keys)
}

/// `<path>.pub`.
pub fn public_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_file_reads_back_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.key");
        let keys = generate(&path).unwrap();
        assert_eq!(read(&path).unwrap(), keys);
        let public = std::fs::read_to_string(public_path(&path)).unwrap();
        assert_eq!(parse_key_hex(&public), Some(keys.public));
        assert!(generate(&path).is_err());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(matches!(read(&path), Err(KeyFileError::Format(_))));
    }
}
