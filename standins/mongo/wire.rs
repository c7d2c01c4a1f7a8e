//! The MongoDB wire protocol, as much as the `mongodb` driver uses: OP_MSG in both directions.
//!
//! A message is a 16-byte header (`messageLength`, `requestID`, `responseTo`, `opCode`, all
//! little-endian i32) and a body. OP_MSG (2013) bodies are `flagBits`, then sections: kind 0 is
//! one BSON document (the command), kind 1 is `size, identifier, documents...` (a document
//! sequence such as insert's `documents`), merged here into the command as an array field.
//! An optional CRC-32C follows when flag bit 0 is set; it is skipped, not checked.
//!
//! OP_QUERY and OP_COMPRESSED are not spoken: the driver sends only OP_MSG, and compression is
//! never negotiated because `hello` names no compressor.

use bson::{Bson, Document};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// OP_MSG opcode.
pub const OP_MSG: i32 = 2013;
/// Flag bit 0: a CRC-32C checksum ends the message.
const CHECKSUM_PRESENT: u32 = 1;
/// Flag bit 1: the sender expects no reply (unacknowledged write).
pub const MORE_TO_COME: u32 = 1 << 1;
/// Flag bit 16: the client accepts exhaust replies (ignored: never used).
const EXHAUST_ALLOWED: u32 = 1 << 16;
/// Largest message accepted (the `maxMessageSizeBytes` advertised in hello).
pub const MAX_MESSAGE_SIZE: usize = 48_000_000;

/// A request as read off the socket.
#[derive(Debug)]
pub struct Request {
    pub request_id: i32,
    pub flags: u32,
    /// The command, with any kind-1 document sequences merged in as arrays.
    pub command: Document,
}

/// Why a message could not be read. `Closed` is the peer hanging up between messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Reads one message. Anything but a well-formed OP_MSG is an error (the caller then closes the
/// connection, as mongod does for garbage).
pub async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Request, WireError> {
    let mut header = [0u8; 16];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = le_i32(&header[0..4]);
    let request_id = le_i32(&header[4..8]);
    let op_code = le_i32(&header[12..16]);
    let length = usize::try_from(length).map_err(|_| malformed("negative messageLength"))?;
    if !(16 + 5..=MAX_MESSAGE_SIZE).contains(&length) {
        return Err(malformed(format!("messageLength {length} out of range")));
    }
    let mut body = vec![0u8; length - 16];
    reader.read_exact(&mut body).await?;
    if op_code != OP_MSG {
        return Err(malformed(format!(
            "opCode {op_code} not supported by the stand-in (OP_MSG only)"
        )));
    }
    let (flags, command) = parse_op_msg(&body)?;
    Ok(Request {
        request_id,
        flags,
        command,
    })
}

/// Parses an OP_MSG body (after the header) into its flags and merged command.
pub fn parse_op_msg(body: &[u8]) -> Result<(u32, Document), WireError> {
    let flags = u32::from_le_bytes(
        body.get(0..4)
            .ok_or_else(|| malformed("no flagBits"))?
            .try_into()
            .map_err(|_| malformed("flagBits"))?,
    );
    let known = CHECKSUM_PRESENT | MORE_TO_COME | EXHAUST_ALLOWED;
    if flags & 0xffff & !known != 0 {
        return Err(malformed(format!("unknown required flag bits {flags:#x}")));
    }
    let end = if flags & CHECKSUM_PRESENT != 0 {
        body.len()
            .checked_sub(4)
            .ok_or_else(|| malformed("checksum flag set but no checksum"))?
    } else {
        body.len()
    };
    let mut pos = 4;
    let mut command: Option<Document> = None;
    let mut sequences: Vec<(String, Vec<Bson>)> = Vec::new();
    while pos < end {
        let kind = body[pos];
        pos += 1;
        match kind {
            0 => {
                let size = doc_size(body, pos, end)?;
                if command.is_some() {
                    return Err(malformed("more than one kind-0 section"));
                }
                command = Some(read_doc(&body[pos..pos + size])?);
                pos += size;
            }
            1 => {
                let size = body
                    .get(pos..pos + 4)
                    .map(le_i32)
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|s| *s >= 5 && pos + s <= end)
                    .ok_or_else(|| malformed("bad kind-1 section size"))?;
                let section = &body[pos + 4..pos + size];
                let nul = section
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or_else(|| malformed("kind-1 identifier not terminated"))?;
                let identifier = String::from_utf8(section[..nul].to_vec())
                    .map_err(|_| malformed("kind-1 identifier not UTF-8"))?;
                let mut docs = Vec::new();
                let mut at = nul + 1;
                while at < section.len() {
                    let n = doc_size(section, at, section.len())?;
                    docs.push(Bson::Document(read_doc(&section[at..at + n])?));
                    at += n;
                }
                sequences.push((identifier, docs));
                pos += size;
            }
            other => return Err(malformed(format!("unknown section kind {other}"))),
        }
    }
    let mut command = command.ok_or_else(|| malformed("no kind-0 section"))?;
    for (identifier, docs) in sequences {
        command.insert(identifier, Bson::Array(docs));
    }
    Ok((flags, command))
}

/// Serializes a reply: OP_MSG, flagBits 0, one kind-0 section.
pub fn encode_reply(request_id: i32, response_to: i32, reply: &Document) -> Vec<u8> {
    let doc = reply
        .to_vec()
        .unwrap_or_else(|e| fallback_error(&format!("reply not serializable: {e}")));
    let length = 16 + 4 + 1 + doc.len();
    let mut out = Vec::with_capacity(length);
    out.extend_from_slice(&i32::try_from(length).unwrap_or(i32::MAX).to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&OP_MSG.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&doc);
    out
}

/// Writes a reply and flushes.
pub async fn write_reply<W: AsyncWrite + Unpin>(
    writer: &mut W,
    request_id: i32,
    response_to: i32,
    reply: &Document,
) -> std::io::Result<()> {
    writer
        .write_all(&encode_reply(request_id, response_to, reply))
        .await?;
    writer.flush().await
}

fn fallback_error(message: &str) -> Vec<u8> {
    let doc =
        bson::doc! { "ok": 0.0, "errmsg": message, "code": 1_i32, "codeName": "InternalError" };
    doc.to_vec().unwrap_or_default()
}

fn le_i32(bytes: &[u8]) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[..4]);
    i32::from_le_bytes(b)
}

/// Size of the BSON document starting at `pos`, checked against `end`.
fn doc_size(buf: &[u8], pos: usize, end: usize) -> Result<usize, WireError> {
    buf.get(pos..pos + 4)
        .map(le_i32)
        .and_then(|s| usize::try_from(s).ok())
        .filter(|s| *s >= 5 && pos + s <= end)
        .ok_or_else(|| malformed("bad BSON document length"))
}

fn read_doc(bytes: &[u8]) -> Result<Document, WireError> {
    Document::from_reader(bytes).map_err(|e| malformed(format!("bad BSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn op_msg_body(sections: &[Vec<u8>]) -> Vec<u8> {
        let mut body = 0u32.to_le_bytes().to_vec();
        for s in sections {
            body.extend_from_slice(s);
        }
        body
    }

    #[test]
    fn merges_kind_one_sequences() {
        let mut kind0 = vec![0u8];
        kind0.extend(doc! {"insert": "c", "$db": "test"}.to_vec().unwrap());
        let d1 = doc! {"_id": 1}.to_vec().unwrap();
        let d2 = doc! {"_id": 2}.to_vec().unwrap();
        let mut kind1 = vec![1u8];
        let size = 4 + "documents".len() + 1 + d1.len() + d2.len();
        kind1.extend(i32::try_from(size).unwrap().to_le_bytes());
        kind1.extend(b"documents\0");
        kind1.extend(&d1);
        kind1.extend(&d2);
        let (flags, command) = parse_op_msg(&op_msg_body(&[kind1, kind0])).unwrap();
        assert_eq!(flags, 0);
        assert_eq!(command.get_str("insert").unwrap(), "c");
        assert_eq!(command.get_array("documents").unwrap().len(), 2);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(parse_op_msg(&[]).is_err());
        assert!(parse_op_msg(&op_msg_body(&[vec![0, 200, 0, 0, 0]])).is_err());
        assert!(parse_op_msg(&op_msg_body(&[vec![7]])).is_err());
        assert!(parse_op_msg(&op_msg_body(&[])).is_err());
        let mut bad_flags = 4u32.to_le_bytes().to_vec();
        bad_flags.push(0);
        assert!(parse_op_msg(&bad_flags).is_err());
    }

    #[test]
    fn reply_round_trips() {
        let reply = doc! {"ok": 1.0};
        let bytes = encode_reply(5, 9, &reply);
        assert_eq!(le_i32(&bytes[0..4]) as usize, bytes.len());
        assert_eq!(le_i32(&bytes[8..12]), 9);
        let (_, parsed) = parse_op_msg(&bytes[16..]).unwrap();
        assert_eq!(parsed, reply);
    }
}
