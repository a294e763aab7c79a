/**
 * # src/nbd: Strata's NBD client and server
 *
 * Every Strata data path is a block stream over NBD (ARCHITECTURE.md). The engine reads a
 * point-in-time export of a VM disk with {@link NbdClient}: it asks for block status in the
 * `qemu:dirty-bitmap:NAME` and `base:allocation` meta contexts and reads only the dirty,
 * allocated extents, many at once. Restores, instant recovery and CDP run the other way:
 * {@link NbdServer} exports any {@link BlockSource} (a restore point fetched chunk by chunk, a
 * journaling target) to QEMU, which needs fixed newstyle, NBD_OPT_GO, structured replies and
 * READ/WRITE/WRITE_ZEROES/FLUSH/DISC (QEMU-NOTES.md). The module imports only src/util.
 *
 * ## What is implemented
 *
 * The fixed newstyle handshake with NBD_OPT_GO/INFO/LIST/EXPORT_NAME/ABORT,
 * STRUCTURED_REPLY and SET/LIST_META_CONTEXT; simple and structured replies (OFFSET_DATA,
 * OFFSET_HOLE, BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE); commands READ, WRITE (FUA),
 * WRITE_ZEROES, TRIM, FLUSH, BLOCK_STATUS, DISC. Not implemented: TLS, extended headers,
 * oldstyle negotiation, RESIZE.
 *
 * ## Concurrency and backpressure
 *
 * Client. Requests carry a 64-bit cookie and replies may come back in any order; the client
 * keeps a map cookie → pending request and one read loop that parses replies off the socket
 * and completes them. At most `maxInFlight` requests are on the wire; callers beyond that wait
 * for a slot, so a fast producer cannot queue unbounded work. A read larger than the server's
 * maximum block size is split into pieces that each take a slot. Every request has a timeout
 * that counts from the call (slot wait included) and rejects with TIMEOUT; the cookie stays
 * registered so a late reply is still parsed and dropped, and its slot is freed only then,
 * because the server is still working on it. Writes to the socket go through a writer that
 * awaits 'drain' when the kernel buffer is full.
 *
 * Server. Each connection reads one request header at a time and hands the request to an async
 * handler, so replies go out in completion order. With `maxInFlight` handlers running, the
 * connection stops reading; the socket reader then pauses the socket once a small buffer is
 * full, the kernel's receive buffer fills and the client is throttled by flow control. A
 * handler's slot is released only after its reply has been accepted by the socket ('drain'
 * awaited), so a client that sends requests but never reads replies holds at most
 * `maxInFlight` replies in server memory.
 *
 * Memory is therefore bounded on both sides by `maxInFlight × 32 MiB` plus small buffers.
 *
 * ## Hostile peers
 *
 * Every length from the wire is checked against a bound in protocol.ts before anything is
 * allocated: option payloads (64 KiB), strings (4 KiB), read/write payloads (32 MiB), block
 * status chunks (2^20 extents), number of option replies and of read fragments. A violation is
 * a `StrataError(PROTOCOL)` and a closed socket; the handshake has a deadline on both sides;
 * nothing a peer sends can throw outside the connection's own promise chain.
 *
 * ## Errors
 *
 * PROTOCOL: the peer broke the protocol (connection closed). TIMEOUT: no reply or handshake in
 * time. ABORTED: the caller's signal fired. NOT_FOUND: no such export. An NBD error number
 * from the server ({@link NbdRequestError}) is NO_SPACE for ENOSPC, otherwise EXTERNAL, and
 * leaves the connection usable.
 *
 * @module
 */

export {
  type ExportInfo,
  type ExportListing,
  type NbdAddress,
  NbdClient,
  type NbdClientOptions,
  NbdRequestError,
} from "./client.js";
export { MemorySource } from "./memory-source.js";
export { BASE_ALLOCATION, DIRTY, type Extent, NbdErrno, StateFlag, TransmissionFlag } from "./protocol.js";
export {
  type BlockSource,
  type NbdExport,
  type NbdListenAddress,
  NbdServer,
  type NbdServerOptions,
  type NbdTlsOptions,
} from "./server.js";
