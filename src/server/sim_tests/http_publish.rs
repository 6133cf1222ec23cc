//! `POST /publish` on one node: the publications of one read are numbered
//! and sent to the mailboxes together, and every request is still answered
//! in order, each `204` with its own number.

use super::*;

fn post(topic: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// The `Corecast-Seq` of each `204` in `wire`, `None` for one without,
/// and the status line of any other answer.
fn answers(wire: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(wire);
    text.split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            let status = r.lines().next().unwrap_or("").to_string();
            match r.lines().find_map(|l| l.strip_prefix("Corecast-Seq: ")) {
                Some(seq) => format!("{status} #{seq}"),
                None => status,
            }
        })
        .collect()
}

#[test]
fn pipelined_publications_of_one_read_are_answered_in_order_with_their_numbers() {
    let mut sim = Sim::new(|_| {});
    let sub = sim.upgrade("/ws?topics=t,u", 1 << 20);
    let key = sim.connect(1 << 20);
    let mut reqs = post("t", b"1");
    reqs.extend(post("u", b"2"));
    reqs.extend(post("t", b"3"));
    reqs.extend(post("nobody", b"-"));
    reqs.extend(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    reqs.extend(post("t", b"4"));
    reqs.extend(post("t", &[0xff; 2]));
    sim.send(key, &reqs);
    let got = answers(&sim.received(key));
    assert_eq!(
        got,
        [
            "204 No Content #1",
            "204 No Content #1",
            "204 No Content #2",
            "204 No Content",
            "200 OK",
            "204 No Content #3",
            "204 No Content #4",
        ],
        "in request order, each with its topic's number"
    );
    // And the subscriber got them in that order.
    let wire = sim.received(sub);
    assert_eq!(
        wire,
        [
            0x82, 1, b'1', 0x82, 1, b'2', 0x82, 1, b'3', 0x82, 1, b'4', 0x82, 2, 0xff, 0xff
        ]
    );
}

#[test]
fn a_refusal_after_publications_comes_after_their_answers() {
    let mut sim = Sim::new(|_| {});
    let _sub = sim.upgrade("/ws?topics=t", 1 << 20);
    let key = sim.connect(1 << 20);
    let mut reqs = post("t", b"1");
    reqs.extend(b"POST /publish/t HTTP/1.1\r\nHost: x\r\n\r\n");
    sim.send(key, &reqs);
    let got = answers(&sim.received(key));
    assert_eq!(got, ["204 No Content #1", "411 Length Required"]);
}
