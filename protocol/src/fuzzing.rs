//! Invariants of the parsers, for the fuzz targets (fuzz/) and their regression tests: each
//! function takes arbitrary bytes and panics only when a parser breaks a promise — a panic
//! inside it, a value it accepts but cannot write back, or one that changes on the way.

use std::path::Path;

use minidom::rxml::{Namespace, NcName};
use minidom::Element;

use crate::job::{JobFile, JobSpec};
use crate::wire::Payload;
use crate::Sha256;

/// What an XML server that writes attribute values raw does to them on the way (Prosody does):
/// the next parser turns their tabs and newlines into spaces.
pub fn normalise_attribute_whitespace(e: &mut Element) {
    let attrs: Vec<(Namespace, NcName, String)> = e
        .attrs()
        .iter()
        .map(|((ns, k), v)| (ns.clone(), k.clone(), v.replace(char::is_whitespace, " ")))
        .collect();
    for (ns, k, v) in attrs {
        e.set_attr(ns, k, v);
    }
    for c in e.children_mut() {
        normalise_attribute_whitespace(c);
    }
}

/// A payload that decodes encodes to XML that decodes to the same payload, also after an XML
/// server passed it on.
pub fn wire_payload(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Payload::from_xml(text) else {
        return;
    };
    let xml = p.to_xml();
    match Payload::from_xml(&xml) {
        Ok(back) => assert_eq!(back, p, "re-encoded as {xml}"),
        Err(e) => panic!("a decoded payload re-encodes to something refused ({e}): {xml}"),
    }
    let mut passed_on = p.to_element();
    normalise_attribute_whitespace(&mut passed_on);
    match Payload::from_element(&passed_on) {
        Ok(back) => assert_eq!(back, p, "changed by a server: {xml}"),
        Err(e) => panic!("refused after a server passed it on ({e}): {xml}"),
    }
}

/// A job file that parses validates, turns into specs that validate, and each spec survives
/// the JSON the manager stores it as.
pub fn job_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = JobFile::parse(text) else {
        return;
    };
    file.validate().expect("a parsed job file validates");
    let Ok(specs) = file.into_specs(Path::new("/jobs"), |_| Some((Sha256::of(b""), 0))) else {
        return;
    };
    for spec in specs {
        spec.validate()
            .unwrap_or_else(|e| panic!("a spec from a valid job file is invalid: {e}: {spec:?}"));
        let json = serde_json::to_string(&spec).expect("a spec serialises");
        let back: JobSpec = serde_json::from_str(&json).expect("a stored spec loads");
        assert_eq!(back, spec);
    }
}
