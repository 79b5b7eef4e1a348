//! What every listener (inbound, outbound, admin) is built from: the one accept loop
//! ([`accept`]), the one body type
//! ([`body`]), denials with their reasons ([`deny`]), the HTTP server settings and
//! hop-by-hop header handling ([`proxy_http`]), the cap on connections per source address
//! ([`per_source`]), and idle tracking and closing ([`idle`]).

pub mod accept;
pub mod body;
pub mod deny;
pub mod idle;
pub mod per_source;
pub mod proxy_http;
