/*
 * Strata's native helpers (src/util/native.ts): AES-256-GCM from and into memory the caller gives,
 * for chunk payloads (src/repo/aead.ts), and huge pages for the large shared buffers
 * (src/util/aligned.ts).
 *
 * Node's Cipher and Decipher return every output in new, zero-filled memory that is freed only
 * when the collector runs; for a backup's or restore's gigabytes that is a second pass over the
 * data and a page fault per fresh page. These two functions call the OpenSSL that the node binary
 * itself is linked with and exports (its EVP interface), on the caller's buffers, and produce
 * exactly the bytes Node's "aes-256-gcm" does (12-byte nonce, 16-byte tag).
 */
#include <limits.h>
#include <node_api.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <sys/mman.h>

static int bytes(napi_env env, napi_value v, const char* what, uint8_t** p, size_t* n) {
  bool is;
  napi_typedarray_type type;
  void* data;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, n, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, what);
    return 0;
  }
  *p = (uint8_t*)data;
  return 1;
}

static int fixed(napi_env env, size_t n, size_t want, const char* what) {
  if (n == want) return 1;
  napi_throw_range_error(env, NULL, what);
  return 0;
}

/* The arguments of seal (key, nonce, aad, data, tag: src and dst both data) and of open (key,
   nonce, aad, src, dst, tag), checked; 0 with a JavaScript exception pending when they are wrong. */
typedef struct {
  uint8_t *key, *nonce, *aad, *src, *dst, *tag;
  size_t aad_len, len;
} gcm_args;

static int parse(napi_env env, napi_callback_info info, int opening, gcm_args* g) {
  size_t argc = 6, want = opening ? 6 : 5, n, dst_len;
  napi_value a[6];
  int i = 3;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return 0;
  if (argc != want) {
    napi_throw_type_error(env, NULL, opening ? "open(key, nonce, aad, src, dst, tag)" : "seal(key, nonce, aad, data, tag)");
    return 0;
  }
  if (!bytes(env, a[0], "key: Uint8Array", &g->key, &n) || !fixed(env, n, 32, "key: 32 bytes") ||
      !bytes(env, a[1], "nonce: Uint8Array", &g->nonce, &n) || !fixed(env, n, 12, "nonce: 12 bytes") ||
      !bytes(env, a[2], "aad: Uint8Array", &g->aad, &g->aad_len) ||
      !bytes(env, a[i++], opening ? "src: Uint8Array" : "data: Uint8Array", &g->src, &g->len))
    return 0;
  g->dst = g->src;
  if (opening && (!bytes(env, a[i++], "dst: Uint8Array", &g->dst, &dst_len) ||
                  !fixed(env, dst_len, g->len, "dst: as long as src")))
    return 0;
  if (!bytes(env, a[i], "tag: Uint8Array", &g->tag, &n) || !fixed(env, n, 16, "tag: 16 bytes")) return 0;
  if (g->aad_len > INT_MAX || g->len > INT_MAX) {
    napi_throw_range_error(env, NULL, "longer than 2 GiB");
    return 0;
  }
  return 1;
}

/* seal(key, nonce, aad, data, tag): encrypts data in place, writes its tag into tag. */
static napi_value Seal(napi_env env, napi_callback_info info) {
  gcm_args g;
  int len = 0, ok;
  if (!parse(env, info, 0, &g)) return NULL;
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  ok = c && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, g.key, g.nonce) == 1;
  ok = ok && (g.aad_len == 0 || EVP_EncryptUpdate(c, NULL, &len, g.aad, (int)g.aad_len) == 1);
  ok = ok && (g.len == 0 || (EVP_EncryptUpdate(c, g.dst, &len, g.src, (int)g.len) == 1 && (size_t)len == g.len));
  ok = ok && EVP_EncryptFinal_ex(c, g.dst + g.len, &len) == 1 && len == 0;
  ok = ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, g.tag) == 1;
  EVP_CIPHER_CTX_free(c);
  if (!ok) napi_throw_error(env, NULL, "AES-256-GCM encryption failed");
  return NULL;
}

/* open(key, nonce, aad, src, dst, tag) -> bool: decrypts src into dst (as long; may be src).
   False when the tag does not match: dst then holds garbage. */
static napi_value Open(napi_env env, napi_callback_info info) {
  gcm_args g;
  napi_value result;
  int len = 0, ok;
  if (!parse(env, info, 1, &g)) return NULL;
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (!c) {
    napi_throw_error(env, NULL, "EVP_CIPHER_CTX_new failed");
    return NULL;
  }
  ok = EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, g.key, g.nonce) == 1;
  ok = ok && (g.aad_len == 0 || EVP_DecryptUpdate(c, NULL, &len, g.aad, (int)g.aad_len) == 1);
  ok = ok && (g.len == 0 || (EVP_DecryptUpdate(c, g.dst, &len, g.src, (int)g.len) == 1 && (size_t)len == g.len));
  ok = ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, g.tag) == 1;
  ok = ok && EVP_DecryptFinal_ex(c, g.dst + g.len, &len) == 1 && len == 0;
  EVP_CIPHER_CTX_free(c);
  napi_get_boolean(env, ok, &result);
  return result;
}

/*
 * adviseHuge(memory): asks for transparent huge pages (madvise MADV_HUGEPAGE) over the whole
 * 2 MiB pages inside memory; returns how many bytes that covers (0: too small, or refused). The
 * first touch of a page costs a fault, and on a paravirtualised guest a dear one: a backup's and
 * a restore's tens of MiB of chunk buffers fault once per 2 MiB instead of once per 4 KiB.
 */
static napi_value AdviseHuge(napi_env env, napi_callback_info info) {
  size_t argc = 1, n;
  napi_value a[1], result;
  uint8_t* p;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return NULL;
  if (argc != 1) {
    napi_throw_type_error(env, NULL, "adviseHuge(memory)");
    return NULL;
  }
  if (!bytes(env, a[0], "memory: Uint8Array", &p, &n)) return NULL;
  const uintptr_t huge = (uintptr_t)2 << 20;
  const uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1), end = ((uintptr_t)p + n) & ~(huge - 1);
  const size_t advised = end > start && madvise((void*)start, end - start, MADV_HUGEPAGE) == 0 ? end - start : 0;
  napi_create_double(env, (double)advised, &result);
  return result;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seal", NULL, Seal, NULL, NULL, NULL, napi_enumerable, NULL},
      {"open", NULL, Open, NULL, NULL, NULL, napi_enumerable, NULL},
      {"adviseHuge", NULL, AdviseHuge, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, 3, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
