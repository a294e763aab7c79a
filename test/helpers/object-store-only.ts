import type { ObjectInfo, PutOptions, Store } from "../../src/repo/store.js";

/**
 * What an S3 object store offers, and nothing more: get, range get, whole-object put, list, head,
 * delete. A call to anything else (touch, conditional delete, read into memory) fails the test.
 */
export class ObjectStoreOnly implements Store {
  readonly calls = new Map<string, number>();
  constructor(private readonly inner: Store) {}
  private count(op: string) {
    this.calls.set(op, (this.calls.get(op) ?? 0) + 1);
  }
  get location() {
    return this.inner.location;
  }
  get(key: string) {
    this.count("get");
    return this.inner.get(key);
  }
  getRange(key: string, offset: number, length: number) {
    this.count("getRange");
    return this.inner.getRange(key, offset, length);
  }
  put(key: string, data: Uint8Array, _options?: PutOptions) {
    this.count("put");
    return this.inner.put(key, Uint8Array.from(data));
  }
  list(prefix: string): AsyncIterable<ObjectInfo> {
    this.count("list");
    return this.inner.list(prefix);
  }
  stat(key: string) {
    this.count("stat");
    return this.inner.stat(key);
  }
  delete(key: string) {
    this.count("delete");
    return this.inner.delete(key);
  }
  async deletePrefix(prefix: string) {
    for await (const o of this.list(prefix)) await this.delete(o.key);
  }
  async touch(): Promise<boolean> {
    throw new Error("touch is not an object-store operation");
  }
  async deleteIfUntouched(): Promise<boolean> {
    throw new Error("deleteIfUntouched is not an object-store operation");
  }
  async sweepTemporary() {
    return 0;
  }
  async flush() {}
  isNotFound(err: unknown) {
    return this.inner.isNotFound(err);
  }
}
