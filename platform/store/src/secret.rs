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

/// Seals secrets at rest (plugin settings' secrets): XChaCha20-Poly1305 under the configured key.
///
/// A sealed value names the key that sealed it: `k1:<key id>:<hex of nonce || ciphertext>`, the key id
/// being a hash of the key. Values are sealed under the primary key and opened under whichever
/// configured key (the primary or a previous one) sealed them, so keys can be rotated: add the new key,
/// make it the primary, reseal what was sealed before ([`SecretBox::needs_resealing`]), drop the old one.
/// Values sealed before key ids existed (bare hex) are opened by trying each configured key.
#[derive(Clone)]
pub struct SecretBox {
    primary: SealingKey,
    previous: Vec<SealingKey>,
}

#[derive(Clone)]
struct SealingKey {
    id: String,
    cipher: chacha20poly1305::XChaCha20Poly1305,
}

impl SealingKey {
    fn new(key: &[u8; 32]) -> Self {
        use chacha20poly1305::KeyInit;
        let mut id = Sha256::new();
        id.update(b"plinth sealing key id\0");
        id.update(key);
        Self {
            id: hex::encode(&id.finalize()[..4]),
            cipher: chacha20poly1305::XChaCha20Poly1305::new(key.into()),
        }
    }

    fn open(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::Aead;
        if bytes.len() < 24 {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(24);
        self.cipher
            .decrypt(chacha20poly1305::XNonce::from_slice(nonce), ciphertext)
            .ok()
    }
}

/// The prefix of a sealed value that names its key.
const SEALED_V1: &str = "k1:";

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("primary", &self.primary.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SecretBox {
    /// Seals and opens under `key` alone.
    #[must_use]
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_previous(key, &[])
    }

    /// Seals under `primary`; opens what `primary` or any of `previous` sealed.
    #[must_use]
    pub fn with_previous(primary: &[u8; 32], previous: &[[u8; 32]]) -> Self {
        let primary = SealingKey::new(primary);
        let previous = previous
            .iter()
            .map(SealingKey::new)
            .filter(|key| key.id != primary.id)
            .collect();
        Self { primary, previous }
    }

    /// A fresh random key.
    #[must_use]
    pub fn generate_key() -> [u8; 32] {
        rand::random()
    }

    /// The id of the key new values are sealed under.
    #[must_use]
    pub fn primary_id(&self) -> &str {
        &self.primary.id
    }

    /// # Errors
    /// Only if encryption itself fails (it does not for in-memory buffers).
    pub fn seal(&self, plaintext: &[u8]) -> crate::Result<String> {
        use chacha20poly1305::aead::{Aead, AeadCore, OsRng};
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .primary
            .cipher
            .encrypt(&nonce, plaintext)
            .map_err(|_| crate::StoreError::Internal("could not seal a secret".into()))?;
        Ok(format!(
            "{SEALED_V1}{}:{}",
            self.primary.id,
            hex::encode([nonce.as_slice(), &sealed].concat())
        ))
    }

    /// # Errors
    /// When the value was sealed under a key that is not configured, or was altered.
    pub fn open(&self, sealed: &str) -> crate::Result<Vec<u8>> {
        let corrupt =
            |why: String| crate::StoreError::Internal(format!("a sealed secret cannot be opened: {why}"));
        let keys = || std::iter::once(&self.primary).chain(&self.previous);
        match sealed.strip_prefix(SEALED_V1) {
            Some(named) => {
                let (id, body) = named.split_once(':').ok_or_else(|| corrupt("malformed".into()))?;
                let key = keys().find(|key| key.id == id).ok_or_else(|| {
                    corrupt(format!(
                        "it was sealed under key {id}, which is neither PLINTH_SECRET_KEY nor in PLINTH_SECRET_KEYS_PREVIOUS"
                    ))
                })?;
                let bytes = hex::decode(body).map_err(|_| corrupt("malformed".into()))?;
                key.open(&bytes)
                    .ok_or_else(|| corrupt(format!("it was altered (key {id})")))
            }
            // Sealed before values named their key.
            None => {
                let bytes = hex::decode(sealed).map_err(|_| corrupt("malformed".into()))?;
                keys()
                    .find_map(|key| key.open(&bytes))
                    .ok_or_else(|| corrupt("no configured key opens it".into()))
            }
        }
    }

    /// Whether `sealed` is not yet sealed under the primary key (a rotation reseals it).
    #[must_use]
    pub fn needs_resealing(&self, sealed: &str) -> bool {
        sealed
            .strip_prefix(SEALED_V1)
            .and_then(|named| named.split_once(':'))
            .is_none_or(|(id, _)| id != self.primary.id)
    }
}

#[cfg(test)]
mod sealing_tests {
    use super::*;

    #[test]
    fn values_name_their_key_and_open_under_it_after_a_rotation() {
        let (old, new) = (SecretBox::generate_key(), SecretBox::generate_key());
        let before = SecretBox::new(&old);
        let sealed = before.seal(b"sk_live_123").unwrap();
        assert!(sealed.starts_with(&format!("k1:{}:", before.primary_id())));
        assert!(!before.needs_resealing(&sealed));

        // The new key is the primary; the old one still opens what it sealed.
        let rotating = SecretBox::with_previous(&new, &[old]);
        assert_eq!(rotating.open(&sealed).unwrap(), b"sk_live_123");
        assert!(rotating.needs_resealing(&sealed));
        let resealed = rotating.seal(&rotating.open(&sealed).unwrap()).unwrap();
        assert!(!rotating.needs_resealing(&resealed));

        // Once the old key is gone, only resealed values open, and the error names the missing key.
        let after = SecretBox::new(&new);
        assert_eq!(after.open(&resealed).unwrap(), b"sk_live_123");
        let missing = after.open(&sealed).unwrap_err().to_string();
        assert!(missing.contains(before.primary_id()), "{missing}");
    }

    #[test]
    fn values_sealed_before_key_ids_still_open_and_get_resealed() {
        use chacha20poly1305::KeyInit;
        use chacha20poly1305::aead::{Aead, AeadCore, OsRng};
        let key = SecretBox::generate_key();
        let cipher = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let legacy = hex::encode([nonce.as_slice(), &cipher.encrypt(&nonce, &b"old"[..]).unwrap()].concat());
        let secrets = SecretBox::with_previous(&SecretBox::generate_key(), &[key]);
        assert_eq!(secrets.open(&legacy).unwrap(), b"old");
        assert!(secrets.needs_resealing(&legacy));
    }

    #[test]
    fn an_altered_value_does_not_open() {
        let secrets = SecretBox::new(&SecretBox::generate_key());
        let sealed = secrets.seal(b"value").unwrap();
        let mut altered = sealed.into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
        assert!(secrets.open(&String::from_utf8(altered).unwrap()).is_err());
        assert!(secrets.open("k1:nokey:00").is_err());
        assert!(secrets.open("not hex").is_err());
    }
}
