/*
 * AES-256-GCM from and into memory the caller gives, for chunk payloads (src/repo/aead.ts).
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

/* seal(key, nonce, aad, data, tag): encrypts data in place, writes its tag into tag. */
static napi_value Seal(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value a[5];
  uint8_t *key, *nonce, *aad, *data, *tag;
  size_t kl, nl, al, dl, tl;
  int len = 0, ok = 1;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return NULL;
  if (argc != 5) {
    napi_throw_type_error(env, NULL, "seal(key, nonce, aad, data, tag)");
    return NULL;
  }
  if (!bytes(env, a[0], "key: Uint8Array", &key, &kl) || !fixed(env, kl, 32, "key: 32 bytes") ||
      !bytes(env, a[1], "nonce: Uint8Array", &nonce, &nl) || !fixed(env, nl, 12, "nonce: 12 bytes") ||
      !bytes(env, a[2], "aad: Uint8Array", &aad, &al) || !bytes(env, a[3], "data: Uint8Array", &data, &dl) ||
      !bytes(env, a[4], "tag: Uint8Array", &tag, &tl) || !fixed(env, tl, 16, "tag: 16 bytes"))
    return NULL;
  if (al > INT_MAX || dl > INT_MAX) {
    napi_throw_range_error(env, NULL, "longer than 2 GiB");
    return NULL;
  }
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (!c) {
    napi_throw_error(env, NULL, "EVP_CIPHER_CTX_new failed");
    return NULL;
  }
  ok = ok && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce) == 1;
  ok = ok && (al == 0 || EVP_EncryptUpdate(c, NULL, &len, aad, (int)al) == 1);
  ok = ok && (dl == 0 || (EVP_EncryptUpdate(c, data, &len, data, (int)dl) == 1 && (size_t)len == dl));
  ok = ok && EVP_EncryptFinal_ex(c, data + dl, &len) == 1 && len == 0;
  ok = ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag) == 1;
  EVP_CIPHER_CTX_free(c);
  if (!ok) napi_throw_error(env, NULL, "AES-256-GCM encryption failed");
  return NULL;
}

/* open(key, nonce, aad, src, dst, tag) -> bool: decrypts src into dst (as long; may be src).
   False when the tag does not match: dst then holds garbage. */
static napi_value Open(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value a[6], result;
  uint8_t *key, *nonce, *aad, *src, *dst, *tag;
  size_t kl, nl, al, sl, dl, tl;
  int len = 0, ok = 1;
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok) return NULL;
  if (argc != 6) {
    napi_throw_type_error(env, NULL, "open(key, nonce, aad, src, dst, tag)");
    return NULL;
  }
  if (!bytes(env, a[0], "key: Uint8Array", &key, &kl) || !fixed(env, kl, 32, "key: 32 bytes") ||
      !bytes(env, a[1], "nonce: Uint8Array", &nonce, &nl) || !fixed(env, nl, 12, "nonce: 12 bytes") ||
      !bytes(env, a[2], "aad: Uint8Array", &aad, &al) || !bytes(env, a[3], "src: Uint8Array", &src, &sl) ||
      !bytes(env, a[4], "dst: Uint8Array", &dst, &dl) || !fixed(env, dl, sl, "dst: as long as src") ||
      !bytes(env, a[5], "tag: Uint8Array", &tag, &tl) || !fixed(env, tl, 16, "tag: 16 bytes"))
    return NULL;
  if (al > INT_MAX || sl > INT_MAX) {
    napi_throw_range_error(env, NULL, "longer than 2 GiB");
    return NULL;
  }
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (!c) {
    napi_throw_error(env, NULL, "EVP_CIPHER_CTX_new failed");
    return NULL;
  }
  ok = ok && EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce) == 1;
  ok = ok && (al == 0 || EVP_DecryptUpdate(c, NULL, &len, aad, (int)al) == 1);
  ok = ok && (sl == 0 || (EVP_DecryptUpdate(c, dst, &len, src, (int)sl) == 1 && (size_t)len == sl));
  ok = ok && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag) == 1;
  ok = ok && EVP_DecryptFinal_ex(c, dst + sl, &len) == 1 && len == 0;
  EVP_CIPHER_CTX_free(c);
  napi_get_boolean(env, ok, &result);
  return result;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seal", NULL, Seal, NULL, NULL, NULL, napi_enumerable, NULL},
      {"open", NULL, Open, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, 2, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
