//! `metav1.Status`: the body of every failure kache answers itself, shaped
//! exactly like the API server's, in JSON and in protobuf, so clients print
//! and act on it (client-go honours `details.retryAfterSeconds`). The cache's
//! `NotFound` and the proxy's own errors (`kache_proxy::error::rescue`) are
//! both written here.

use http::StatusCode;
use serde::Serialize;

use crate::protobuf::{object_body, put_field, put_varint};

/// A failure `Status`. `reason` follows the code, as the API server's
/// `NewXxx` constructors set it ([`reason_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status<'a> {
    pub code: StatusCode,
    pub message: &'a str,
    /// Present on every error the API server builds with details (not
    /// found, forbidden, too many requests); `None` leaves the field out.
    pub details: Option<Details<'a>>,
}

/// `metav1.StatusDetails`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Details<'a> {
    pub name: &'a str,
    pub group: &'a str,
    /// The resource (plural) for `NotFound` and `Forbidden`, as the API
    /// server's `qualifiedResource` gives it.
    pub kind: &'a str,
    /// Why, field by field (`422 Invalid`).
    pub causes: &'a [Cause],
    pub retry_after_seconds: Option<u32>,
}

/// `metav1.StatusCause`. `errors.NewInvalid` makes one of each field error:
/// its type, its body (the error without the field's path), the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// `metav1.CauseType`: a `field.ErrorType` (`FieldValueForbidden`…),
    /// or `ResourceVersionTooLarge`.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub field: &'static str,
}

/// The `StatusReason` the API server uses for a code (metav1.StatusReason*).
pub fn reason_for(code: StatusCode) -> &'static str {
    match code.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

impl<'a> Status<'a> {
    pub fn failure(code: StatusCode, message: &'a str) -> Status<'a> {
        Status {
            code,
            message,
            details: None,
        }
    }

    pub fn with_details(mut self, details: Details<'a>) -> Status<'a> {
        self.details = Some(details);
        self
    }

    /// The JSON body, newline-terminated as the API server writes it; empty
    /// detail fields are left out, as Go's `omitempty` does.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Json<'a> {
            kind: &'static str,
            api_version: &'static str,
            metadata: Empty,
            status: &'static str,
            message: &'a str,
            reason: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            details: Option<JsonDetails<'a>>,
            code: u16,
        }
        #[derive(Serialize)]
        struct Empty {}
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct JsonDetails<'a> {
            #[serde(skip_serializing_if = "str::is_empty")]
            name: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            group: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            kind: &'a str,
            #[serde(skip_serializing_if = "<[Cause]>::is_empty")]
            causes: &'a [Cause],
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_seconds: Option<u32>,
        }
        let json = Json {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message: self.message,
            reason: reason_for(self.code),
            details: self.details.as_ref().map(|d| JsonDetails {
                name: d.name,
                group: d.group,
                kind: d.kind,
                causes: d.causes,
                retry_after_seconds: d.retry_after_seconds,
            }),
            code: self.code.as_u16(),
        };
        let mut body = serde_json::to_vec(&json).expect("invariant: a Status serializes");
        body.push(b'\n');
        body
    }

    /// The protobuf body (`k8s\0` + `runtime.Unknown` of a `v1` `Status`),
    /// field for field as the API server's generated marshaller writes it:
    /// strings always (even empty), `details` only when set.
    pub fn to_protobuf(&self) -> Vec<u8> {
        let mut status = Vec::new();
        // ListMeta{selfLink: "", resourceVersion: "", continue: ""}.
        put_field(&mut status, 1, &[0x0a, 0x00, 0x12, 0x00, 0x1a, 0x00]);
        put_field(&mut status, 2, b"Failure");
        put_field(&mut status, 3, self.message.as_bytes());
        put_field(&mut status, 4, reason_for(self.code).as_bytes());
        if let Some(d) = &self.details {
            let mut details = Vec::new();
            put_field(&mut details, 1, d.name.as_bytes());
            put_field(&mut details, 2, d.group.as_bytes());
            put_field(&mut details, 3, d.kind.as_bytes());
            for cause in d.causes {
                let mut encoded = Vec::new();
                put_field(&mut encoded, 1, cause.reason.as_bytes());
                put_field(&mut encoded, 2, cause.message.as_bytes());
                put_field(&mut encoded, 3, cause.field.as_bytes());
                put_field(&mut details, 4, &encoded);
            }
            // retryAfterSeconds (int32, always written), then uid: "".
            details.push(5 << 3);
            put_varint(&mut details, u64::from(d.retry_after_seconds.unwrap_or(0)));
            details.extend_from_slice(&[0x32, 0x00]);
            put_field(&mut status, 5, &details);
        }
        status.push(6 << 3);
        put_varint(&mut status, u64::from(self.code.as_u16()));
        object_body("v1", "Status", &status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_leaves_out_what_go_omits() {
        let body = Status::failure(StatusCode::SERVICE_UNAVAILABLE, "upstream down")
            .with_details(Details {
                retry_after_seconds: Some(1),
                ..Details::default()
            })
            .to_json();
        assert_eq!(body.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            value,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "upstream down", "reason": "ServiceUnavailable",
                "details": {"retryAfterSeconds": 1}, "code": 503
            })
        );
        let bare: serde_json::Value =
            serde_json::from_slice(&Status::failure(StatusCode::UNAUTHORIZED, "Unauthorized").to_json())
                .expect("json");
        assert!(bare.get("details").is_none(), "{bare}");
        assert_eq!(bare["reason"], "Unauthorized");
    }

    #[test]
    fn reasons_follow_metav1() {
        assert_eq!(reason_for(StatusCode::BAD_REQUEST), "BadRequest");
        assert_eq!(reason_for(StatusCode::GATEWAY_TIMEOUT), "Timeout");
        assert_eq!(reason_for(StatusCode::BAD_GATEWAY), "InternalError");
        assert_eq!(reason_for(StatusCode::TOO_MANY_REQUESTS), "TooManyRequests");
    }

    /// The API server's own bytes (v1.20) for `GET
    /// /api/v1/namespaces/default/configmaps/nope` with `Accept:
    /// application/vnd.kubernetes.protobuf`.
    #[test]
    fn protobuf_not_found_is_the_api_servers_message() {
        let body = Status::failure(StatusCode::NOT_FOUND, "configmaps \"nope\" not found")
            .with_details(Details {
                name: "nope",
                kind: "configmaps",
                ..Details::default()
            })
            .to_protobuf();
        let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "6b3873000a0c0a027631120653746174757312550a060a0012001a0012074661696c7572651a1b636f6e6669676d\
             61707320226e6f706522206e6f7420666f756e6422084e6f74466f756e642a180a046e6f706512001a0a636f6e\
             6669676d617073280032003094031a002200"
        );
    }
}
