//! Who may act. Without a token the console is read-only: no action button is drawn and
//! every POST is refused (403). With one, a browser signs in with the token and a name
//! (the name is what the log records as the actor) and gets an HttpOnly, SameSite=Strict
//! cookie; every form carries a CSRF value derived from that cookie, and a POST's Origin
//! must be the console itself. A script sends `Authorization: Bearer TOKEN` (and
//! `X-Reel-Actor: NAME`), with no cookie and so no CSRF value.
//!
//! The cookie holds the name and a MAC over it keyed by a secret drawn at start and the
//! token: it never holds the token, a restart signs everyone out, and a changed token
//! too. Nothing secret is ever written into a page.

use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{KeyInit, Mac};
use maud::html;
use serde::Deserialize;

type HmacSha256 = hmac::Hmac<sha2_hmac::Sha256>;

use super::Console;
use super::pages::{layout, page_error};

/// The shortest token accepted (a guessable token would be a hole).
pub(crate) const MIN_TOKEN_CHARS: usize = 16;

const COOKIE: &str = "reel_console";

/// The longest actor name kept.
const NAME_MAX_CHARS: usize = 60;

#[derive(Debug)]
pub(crate) struct Auth {
    token: Option<String>,
    /// Drawn at start: sessions die with the process.
    key: [u8; 32],
}

/// Who is asking, as far as the console can tell.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// Not signed in (or no token configured): reads only.
    Reader,
    /// Signed in with the browser cookie: actions need the CSRF value too.
    Browser { name: String, csrf: String },
    /// The bearer token: actions need nothing more.
    Script { name: String },
}

impl Caller {
    pub(crate) fn may_act(&self) -> bool {
        !matches!(self, Caller::Reader)
    }

    /// The CSRF value to put in forms (empty when there is no session).
    pub(crate) fn csrf(&self) -> &str {
        match self {
            Caller::Browser { csrf, .. } => csrf,
            _ => "",
        }
    }

    pub(crate) fn name(&self) -> Option<&str> {
        match self {
            Caller::Browser { name, .. } | Caller::Script { name } => Some(name),
            Caller::Reader => None,
        }
    }
}

/// Why a request may not act.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No token configured: the console is read-only (403).
    ReadOnly,
    /// No (or a wrong) credential (401).
    Unauthenticated,
    /// A cross-site request, or a form without its CSRF value (403).
    Forged,
}

impl Auth {
    pub(crate) fn new(token: Option<String>) -> Auth {
        Auth {
            token: token.map(|t| t.trim().to_owned()),
            key: rand::random(),
        }
    }

    /// Whether actions are possible at all.
    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// HMAC-SHA256 of `purpose` and `value`, keyed by the start secret and the token.
    fn hmac(&self, purpose: &str, value: &str) -> HmacSha256 {
        let mut key = self.key.to_vec();
        key.extend_from_slice(self.token.as_deref().unwrap_or_default().as_bytes());
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&key).expect("HMAC takes a key of any length");
        mac.update(purpose.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac
    }

    fn mac(&self, purpose: &str, value: &str) -> String {
        hex(&self.hmac(purpose, value).finalize().into_bytes())
    }

    /// Whether `mac` (hex) is `value`'s, compared in constant time.
    fn verify(&self, purpose: &str, value: &str, mac: &str) -> bool {
        let Some(bytes) = unhex(mac) else {
            return false;
        };
        self.hmac(purpose, value).verify_slice(&bytes).is_ok()
    }

    fn token_matches(&self, given: &str) -> bool {
        // The given token's MAC checked in constant time: no timing tells how much of it
        // was right.
        let Some(token) = &self.token else {
            return false;
        };
        let expected = self.hmac("token", token).finalize().into_bytes();
        self.hmac("token", given.trim())
            .verify_slice(&expected)
            .is_ok()
    }

    /// The caller of a request with these headers.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Caller {
        if !self.enabled() {
            return Caller::Reader;
        }
        if let Some(bearer) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
        {
            if self.token_matches(bearer) {
                let name = headers
                    .get("x-reel-actor")
                    .and_then(|v| v.to_str().ok())
                    .map(clean_name)
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "script".to_owned());
                return Caller::Script { name };
            }
            return Caller::Reader;
        }
        let Some(session) = cookie(headers, COOKIE) else {
            return Caller::Reader;
        };
        let Some((name, mac)) = session.rsplit_once('.') else {
            return Caller::Reader;
        };
        let Some(name) = decode_name(name) else {
            return Caller::Reader;
        };
        if !self.verify("session", &name, mac) {
            return Caller::Reader;
        }
        Caller::Browser {
            csrf: self.mac("csrf", mac),
            name,
        }
    }

    /// May this request act? `csrf`: the form's value (a browser's POST).
    pub(crate) fn check_action(
        &self,
        headers: &HeaderMap,
        csrf: Option<&str>,
    ) -> Result<Caller, Refusal> {
        if !self.enabled() {
            return Err(Refusal::ReadOnly);
        }
        let caller = self.caller(headers);
        match &caller {
            Caller::Reader => Err(Refusal::Unauthenticated),
            Caller::Script { .. } => Ok(caller),
            Caller::Browser { csrf: expected, .. } => {
                if !same_origin(headers) || csrf != Some(expected.as_str()) {
                    return Err(Refusal::Forged);
                }
                Ok(caller)
            }
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, why) = match self {
            Refusal::ReadOnly => (
                StatusCode::FORBIDDEN,
                "This console is read-only: start it with --token to allow actions.",
            ),
            Refusal::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "Sign in with the console's token to act.",
            ),
            Refusal::Forged => (
                StatusCode::FORBIDDEN,
                "Refused: the request did not come from this console's own page.",
            ),
        };
        page_error(status, why)
    }
}

/// Whether a POST comes from the console's own pages: its Origin (or, without one, its
/// Referer) names the host it was sent to. A browser always sends Origin on a POST.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(from) = from else {
        return false;
    };
    let rest = from
        .strip_prefix("http://")
        .or_else(|| from.strip_prefix("https://"))
        .unwrap_or_default();
    let origin_host = rest.split('/').next().unwrap_or_default();
    origin_host.eq_ignore_ascii_case(host)
}

/// The Host values a loopback console answers: its own address by IP or as `localhost`.
/// Anything else is a page of another site reaching it by DNS rebinding.
pub(crate) fn loopback_hosts(listen: std::net::SocketAddr) -> Vec<String> {
    let port = listen.port();
    vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        listen.to_string(),
    ]
}

/// Refuses (421) a request whose Host is not one of `allowed`.
pub(crate) async fn check_host(
    allowed: Arc<Vec<String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return next.run(request).await;
    }
    page_error(
        StatusCode::MISDIRECTED_REQUEST,
        "This console answers only at its own address.",
    )
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A name as the log will record it: printable, trimmed, bounded.
fn clean_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control())
        .take(NAME_MAX_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The name in a cookie: hex of its UTF-8 (a cookie value takes no spaces or semicolons).
fn encode_name(name: &str) -> String {
    hex(name.as_bytes())
}

/// The name in a cookie, if it is exactly hex of UTF-8.
fn decode_name(hex: &str) -> Option<String> {
    String::from_utf8(unhex(hex)?).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

pub(crate) async fn login_form(State(console): State<Arc<Console>>) -> Response {
    if !console.auth.enabled() {
        return page_error(
            StatusCode::FORBIDDEN,
            "This console is read-only: start it with --token to allow actions.",
        );
    }
    login_page(StatusCode::OK, None)
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(error) = error { p.error { (error) } }
        form method="post" action="/login" {
            label { "Your name (the log records it with every action) " input name="name" required maxlength="60"; }
            label { "Token " input name="token" type="password" required autocomplete="current-password"; }
            button type="submit" { "Sign in" }
        }
    };
    (status, layout("Sign in", None, body)).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    name: String,
    token: String,
}

pub(crate) async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !console.auth.enabled() {
        return Refusal::ReadOnly.into_response();
    }
    if !same_origin(&headers) {
        return Refusal::Forged.into_response();
    }
    let name = clean_name(&form.name);
    if name.is_empty() || !console.auth.token_matches(&form.token) {
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("Wrong token (or no name): nothing changed."),
        );
    }
    let value = format!(
        "{COOKIE}={}.{}; HttpOnly; SameSite=Strict; Path=/",
        encode_name(&name),
        console.auth.mac("session", &name)
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

pub(crate) async fn logout(headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return Refusal::Forged.into_response();
    }
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("reel_console=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        map
    }

    #[test]
    fn a_session_is_the_name_and_its_mac_and_forms_need_their_csrf_value() {
        let auth = Auth::new(Some("a-token-of-enough-length".into()));
        let mac = auth.mac("session", "Ann O'Neil");
        let cookie = format!("{COOKIE}={}.{mac}", encode_name("Ann O'Neil"));
        let signed_in = headers(&[
            ("cookie", &cookie),
            ("host", "127.0.0.1:7878"),
            ("origin", "http://127.0.0.1:7878"),
        ]);
        let Caller::Browser { name, csrf } = auth.caller(&signed_in) else {
            panic!("signed in");
        };
        assert_eq!(name, "Ann O'Neil");
        assert!(auth.check_action(&signed_in, Some(&csrf)).is_ok());
        assert_eq!(
            auth.check_action(&signed_in, None).err(),
            Some(Refusal::Forged)
        );
        // Another origin, even with the value.
        let elsewhere = headers(&[
            ("cookie", &cookie),
            ("host", "127.0.0.1:7878"),
            ("origin", "http://evil.example"),
        ]);
        assert_eq!(
            auth.check_action(&elsewhere, Some(&csrf)).err(),
            Some(Refusal::Forged)
        );
        // A forged name keeps the MAC of another.
        let forged = format!("{COOKIE}={}.{mac}", encode_name("admin"));
        assert!(matches!(
            auth.caller(&headers(&[("cookie", &forged)])),
            Caller::Reader
        ));
        // Not exactly hex of the name: refused.
        let odd = format!("{COOKIE}={}ZZ.{mac}", encode_name("Ann O'Neil"));
        assert!(matches!(
            auth.caller(&headers(&[("cookie", &odd)])),
            Caller::Reader
        ));
        // Another process (another key) does not know the session.
        let restarted = Auth::new(Some("a-token-of-enough-length".into()));
        assert!(matches!(restarted.caller(&signed_in), Caller::Reader));
    }

    #[test]
    fn bearer_tokens_act_and_a_read_only_console_refuses_everyone() {
        let auth = Auth::new(Some("a-token-of-enough-length".into()));
        let script = headers(&[
            ("authorization", "Bearer a-token-of-enough-length"),
            (
                "x-reel-actor",
                &format!("  nightly job{}  ", "x".repeat(100)),
            ),
        ]);
        let Ok(Caller::Script { name }) = auth.check_action(&script, None) else {
            panic!("the bearer acts");
        };
        // Trimmed and bounded, as the log will keep it.
        assert_eq!(
            name,
            format!("nightly job{}", "x".repeat(NAME_MAX_CHARS - 13))
        );
        assert_eq!(clean_name("a\u{7}b\nc"), "abc");
        let lower = headers(&[("authorization", "bearer a-token-of-enough-length")]);
        assert!(
            auth.check_action(&lower, None).is_ok(),
            "the scheme is case-insensitive"
        );
        let wrong = headers(&[("authorization", "Bearer not-the-token-at-all")]);
        assert_eq!(
            auth.check_action(&wrong, None).err(),
            Some(Refusal::Unauthenticated)
        );
        let read_only = Auth::new(None);
        assert_eq!(
            read_only.check_action(&script, None).err(),
            Some(Refusal::ReadOnly)
        );
    }
}
