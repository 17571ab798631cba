//! Bearer secrets and passwords: generation, the checksum that lets us reject a mistyped or made-up key
//! without a database round trip, and the hashes we store instead of the secrets.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// Every API key starts with this, so secret scanners (and people) recognise one in a leaked file.
pub const API_KEY_PREFIX: &str = "plk_live_";
/// Login session tokens.
pub const SESSION_PREFIX: &str = "pls_";

/// 32 base62 characters: about 190 bits of entropy.
const KEY_BODY_LEN: usize = 32;
/// CRC32 of the body in fixed-width base62, as GitHub's tokens do.
const CHECKSUM_LEN: usize = 6;
const SESSION_BODY_LEN: usize = 43;

fn random_base62(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn checksum(body: &str) -> String {
    format!(
        "{:0>width$}",
        base62::encode(crc32fast::hash(body.as_bytes())),
        width = CHECKSUM_LEN
    )
}

/// A fresh API key: `plk_live_<32 random base62><6 checksum>`.
#[must_use]
pub fn new_api_key() -> String {
    let body = random_base62(KEY_BODY_LEN);
    let check = checksum(&body);
    format!("{API_KEY_PREFIX}{body}{check}")
}

/// Whether a string has the shape and checksum of an API key. Cheap; says nothing about whether the key
/// exists.
#[must_use]
pub fn is_well_formed_api_key(token: &str) -> bool {
    let Some(rest) = token.strip_prefix(API_KEY_PREFIX) else {
        return false;
    };
    if rest.len() != KEY_BODY_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (body, check) = rest.split_at(KEY_BODY_LEN);
    checksum(body) == check
}

#[must_use]
pub fn new_session_token() -> String {
    format!("{SESSION_PREFIX}{}", random_base62(SESSION_BODY_LEN))
}

#[must_use]
pub fn is_well_formed_session_token(token: &str) -> bool {
    token
        .strip_prefix(SESSION_PREFIX)
        .is_some_and(|body| body.len() == SESSION_BODY_LEN && body.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// What we store for a bearer secret: hex SHA-256. The secrets have ~190 bits of entropy, so a fast
/// hash is safe here (unlike passwords) and keeps verification in microseconds.
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `plk_live_AbCd…wxyz`: enough to recognise a key in a list, useless to an attacker.
#[must_use]
pub fn redact(token: &str) -> String {
    let body = &token[API_KEY_PREFIX.len()..];
    format!("{API_KEY_PREFIX}{}…{}", &body[..4], &body[body.len() - 4..])
}

/// argon2id with the crate's defaults (19 MiB, 2 passes), as OWASP recommends. Slow on purpose: call
/// from a blocking thread.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| format!("password hashing failed: {err}"))
}

/// Constant-time verification against a stored PHC string. Call from a blocking thread.
#[must_use]
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_carry_a_valid_checksum() {
        let key = new_api_key();
        assert_eq!(key.len(), API_KEY_PREFIX.len() + KEY_BODY_LEN + CHECKSUM_LEN);
        assert!(is_well_formed_api_key(&key));
        // One changed character breaks the checksum.
        let mut typo = key.clone().into_bytes();
        let i = API_KEY_PREFIX.len() + 3;
        typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed_api_key(&String::from_utf8(typo).unwrap()));
        assert!(!is_well_formed_api_key("plk_live_short"));
        assert!(!is_well_formed_api_key(&new_session_token()));
    }

    #[test]
    fn redaction_keeps_only_the_ends() {
        let key = new_api_key();
        let redacted = redact(&key);
        assert!(redacted.starts_with(&key[..API_KEY_PREFIX.len() + 4]));
        assert!(redacted.ends_with(&key[key.len() - 4..]));
        assert!(redacted.chars().count() < key.len());
    }

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a phc string"));
    }
}

/// Seals secrets at rest (plugin settings' secrets): XChaCha20-Poly1305 under a 32-byte key from the
/// configuration. A sealed value is hex of `nonce || ciphertext`.
#[derive(Clone)]
pub struct SecretBox {
    cipher: chacha20poly1305::XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    #[must_use]
    pub fn new(key: &[u8; 32]) -> Self {
        use chacha20poly1305::KeyInit;
        Self {
            cipher: chacha20poly1305::XChaCha20Poly1305::new(key.into()),
        }
    }

    /// A fresh random key.
    #[must_use]
    pub fn generate_key() -> [u8; 32] {
        rand::random()
    }

    /// # Errors
    /// Only if encryption itself fails (it does not for in-memory buffers).
    pub fn seal(&self, plaintext: &[u8]) -> crate::Result<String> {
        use chacha20poly1305::aead::{Aead, AeadCore, OsRng};
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(&nonce, plaintext)
            .map_err(|_| crate::StoreError::Internal("could not seal a secret".into()))?;
        Ok(hex::encode([nonce.as_slice(), &sealed].concat()))
    }

    /// # Errors
    /// When the value was not sealed under this key, or was altered.
    pub fn open(&self, sealed: &str) -> crate::Result<Vec<u8>> {
        use chacha20poly1305::aead::Aead;
        let corrupt =
            || crate::StoreError::Internal("a sealed secret cannot be opened with the configured key".into());
        let bytes = hex::decode(sealed).map_err(|_| corrupt())?;
        if bytes.len() < 24 {
            return Err(corrupt());
        }
        let (nonce, ciphertext) = bytes.split_at(24);
        self.cipher
            .decrypt(chacha20poly1305::XNonce::from_slice(nonce), ciphertext)
            .map_err(|_| corrupt())
    }
}
