//! The HTTP(S) connector every outbound client is built on: rustls with the webpki roots, HTTP/1.1 and HTTP/2.

use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

pub type Connector = HttpsConnector<HttpConnector>;

pub fn connector(connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().enable_http2().wrap_connector(http)
}
