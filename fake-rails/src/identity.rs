//! Workload identity: one RS256 key, its JWKS, and compact JWTs signed with it.
//!
//! The default key is a fixed, test-only key (`keys/test-signing-key.pem`,
//! made once with `openssl genpkey`): generating a 2048-bit key takes
//! seconds in debug builds. It is public, so tokens it signs prove nothing
//! outside tests. `--signing-key PATH` or `--generate-signing-key` replace it.

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};

use crate::config::SigningKeySource;

/// The test-only signing key shipped with the crate.
pub const EMBEDDED_TEST_KEY_PEM: &str = include_str!("../keys/test-signing-key.pem");

/// An RS256 signing key with its public JWK.
#[derive(Clone)]
pub struct IdentityKey {
    signing_key: SigningKey<Sha256>,
    jwk: serde_json::Value,
    kid: String,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl IdentityKey {
    pub fn load(source: &SigningKeySource) -> anyhow::Result<Self> {
        match source {
            SigningKeySource::EmbeddedTestKey => Self::from_pem(EMBEDDED_TEST_KEY_PEM),
            SigningKeySource::PemFile(path) => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading signing key `{}`", path.display()))?;
                Self::from_pem(&pem)
                    .with_context(|| format!("parsing signing key `{}`", path.display()))
            }
            SigningKeySource::Generate => {
                let key = RsaPrivateKey::new(&mut rand_core06::OsRng, 2048)
                    .context("generating an RSA key")?;
                Ok(Self::from_private_key(key))
            }
        }
    }

    /// A PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM.
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
            .context("not an RSA private key in PKCS#8 or PKCS#1 PEM")?;
        Ok(Self::from_private_key(key))
    }

    fn from_private_key(key: RsaPrivateKey) -> Self {
        let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
        // RFC 7638 thumbprint: the required members, sorted, no whitespace.
        let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        let jwk = serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": e});
        IdentityKey {
            signing_key: SigningKey::<Sha256>::new(key),
            jwk,
            kid,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `{"keys": [<jwk>]}`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk] })
    }

    /// A compact RS256 JWT over `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.signing_key.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}
