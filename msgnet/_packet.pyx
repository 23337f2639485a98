"""DATA and PLAIN_DATA packets (docs/wire.md §2.2, §2.6), the replay window, and the fixed-layout
stateless packets (§2.4, §2.5, §2.7).

The engine cimports the C API of ``_packet.pxd``; the ``def`` methods serve tests, tools and the
benchmarks. ``_packet_py.py`` is the pure-Python twin the tests check this module against.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t, UINT64_MAX
from libc.string cimport memcpy, memmove, memset

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from msgnet import limits
from msgnet.errors import ClosedError, FrameError, ProtocolViolation, UsageError

# Indexed by -code of open_into; the names are the drop counters of docs/wire.md, except
# out_of_room (a caller's buffer too small: a local bug, never the peer's doing).
DROP_REASON_NAMES = (
    "ok",
    "truncated",
    "replay",
    "auth_failed",
    "counter_exhausted",
    "plaintext_refused",
    "unknown_session",
    "out_of_room",
)

# The pxd's C constants, visible to the test that checks them against limits.py.
PXD_CONSTANTS = {
    "PACKET_INITIATION": PACKET_INITIATION,
    "PACKET_RESPONSE": PACKET_RESPONSE,
    "PACKET_FINISH": PACKET_FINISH,
    "PACKET_DATA": PACKET_DATA,
    "PACKET_COOKIE": PACKET_COOKIE,
    "PACKET_SESSION_UNKNOWN": PACKET_SESSION_UNKNOWN,
    "PACKET_PLAIN_DATA": PACKET_PLAIN_DATA,
    "PACKET_VERSION_UNSUPPORTED": PACKET_VERSION_UNSUPPORTED,
    "DATA_HEADER_SIZE": DATA_HEADER_SIZE,
    "AEAD_TAG_SIZE": AEAD_TAG_SIZE,
    "DATA_OVERHEAD": DATA_OVERHEAD,
    "REPLAY_WINDOW": C_REPLAY_WINDOW,
}

# Counters at or above this are refused both ways (REJECT_AFTER_MESSAGES, §2.3.2).
cdef uint64_t _REJECT_AFTER = limits.REJECT_AFTER_MESSAGES
cdef uint64_t _AES_REJECT_AFTER_BYTES = limits.AES_GCM_REJECT_AFTER_BYTES
# Packets an AES session seals and opens before it keeps its key schedules expanded
# (SessionCrypto._aes_keys_now).
cdef uint32_t _AES_KEYS_AFTER = 64
AES_KEYS_AFTER = _AES_KEYS_AFTER

cdef enum:
    _SESSION_UNKNOWN_SIZE = 29
    _COOKIE_SIZE = 16
    _COOKIE_PACKET_SIZE = 21
    _VERSION_HEADER_SIZE = 6


cdef inline void _store_u32_be(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline void _store_u64_be(uint8_t* p, uint64_t v) noexcept nogil:
    _store_u32_be(p, <uint32_t>(v >> 32))
    _store_u32_be(p + 4, <uint32_t>v)


cdef inline void _store_nonce(uint8_t* nonce, uint64_t counter) noexcept nogil:
    """The 12-byte nonce of docs/wire.md §2.2: 4 zero bytes, then counter as u64 little-endian.
    Written out byte by byte, which the C compiler merges into one store (a loop was 60
    instructions per packet)."""
    memset(nonce, 0, 4)
    nonce[4] = <uint8_t>counter
    nonce[5] = <uint8_t>(counter >> 8)
    nonce[6] = <uint8_t>(counter >> 16)
    nonce[7] = <uint8_t>(counter >> 24)
    nonce[8] = <uint8_t>(counter >> 32)
    nonce[9] = <uint8_t>(counter >> 40)
    nonce[10] = <uint8_t>(counter >> 48)
    nonce[11] = <uint8_t>(counter >> 56)


cdef class _CBuffer:
    """Exports ptr[0:shape[0]] through the buffer protocol.

    Re-aiming one of these per AEAD call costs nothing, where a fresh memoryview per buffer
    costs an allocation: six per packet, measured at 10-13% of a 64-byte seal + open.
    """

    def __cinit__(self, bint writable):
        self.writable = writable
        self.strides[0] = 1

    def __getbuffer__(self, Py_buffer* view, int flags):
        if flags & PyBUF_WRITABLE and not self.writable:
            raise BufferError("read-only window")
        view.buf = self.ptr
        view.obj = self
        view.len = self.shape[0]
        view.readonly = not self.writable
        view.itemsize = 1
        view.format = "B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL


cdef inline _CBuffer _aim(_CBuffer window, const uint8_t* p, Py_ssize_t n):
    window.ptr = <char*>p
    window.shape[0] = n
    return window


cdef class ReplayWindow:
    """RFC 6479 ring bitmap: bit (counter mod 1024) marks counter as seen.

    The bitmap has no spare word, so moving forward clears exactly the bits of the counters
    that leave the window (whole words where the jump spans them): the window stays exactly
    REPLAY_WINDOW counters wide, as docs/wire.md §2.2 defines it. A new window is all zero
    (allocation zeroes it): nothing seen.
    """

    cdef bint check(self, uint64_t counter) noexcept nogil:
        if counter == UINT64_MAX:
            return False  # highest = counter + 1 would not fit; far beyond the session limit
        if counter >= self.highest:
            return True
        if self.highest - counter > C_REPLAY_WINDOW:
            return False  # at or below highest_seen - REPLAY_WINDOW
        return not (self.bitmap[(counter >> 6) & 15] >> (counter & 63)) & 1

    cdef bint update(self, uint64_t counter) noexcept nogil:
        cdef uint64_t pos, n, mask
        if not self.check(counter):
            return False
        if counter >= self.highest:
            # Counters highest..counter enter the window; their ring bits belonged to
            # counters that now leave it.
            if counter - self.highest >= C_REPLAY_WINDOW:
                memset(self.bitmap, 0, sizeof(self.bitmap))
            else:
                pos = self.highest
                while pos <= counter:
                    n = 64 - (pos & 63)
                    if n > counter - pos + 1:
                        n = counter - pos + 1
                    mask = (<uint64_t>-1 >> (64 - n)) << (pos & 63)
                    self.bitmap[(pos >> 6) & 15] &= ~mask
                    pos += n
            self.highest = counter + 1
        self.bitmap[(counter >> 6) & 15] |= <uint64_t>1 << (counter & 63)
        return True

    def accept(self, uint64_t counter) -> bool:
        """Check and mark counter, as open_into does after a packet authenticates."""
        return self.update(counter)

    def would_accept(self, uint64_t counter) -> bool:
        """Whether accept(counter) would succeed; changes nothing."""
        return self.check(counter)


# ---------------------------------------------------------------------------------------------
# The AEAD seam: the only place that encrypts or decrypts DATA. Two C function pointers,
# _aead_seal and _aead_open, point at one backend (each computes RFC 8439's AEAD, byte for
# byte the same); everything else sees pointers, lengths, a key and a counter.
#
# "sodium": libsodium's crypto_aead_chacha20poly1305_ietf_*_detached, linked when setup.py found
#   its headers: stateless calls with a short path, the cheapest for small packets.
# "sodium+openssl" (when both are linked): libsodium for small packets, libcrypto for large ones
#   (see _SODIUM_BELOW).
# "openssl": libcrypto's EVP ChaCha20-Poly1305, linked when setup.py found the OpenSSL headers.
#   One EVP_CIPHER_CTX per direction for the whole process, given the packet's nonce on every
#   call and the session's key when it differs from the last call's: re-keying costs ~70 ns
#   (measured on OpenSSL 3.0), where a context per session and direction would cost hundreds
#   of bytes per idle session. The tag goes through an OSSL_PARAM list built here, not
#   EVP_CIPHER_CTX_ctrl, which builds one on every call (~200 ns).
#   cryptography, by contrast, sets up a context per call (1.4 us for 64 bytes).
# "cryptography": cryptography's ChaCha20Poly1305.encrypt_into/decrypt_into, always available.
#   Its objects hold two contexts (2.3 KB) and cost ~0.9 us to build, so the few in use are
#   kept in a small cache by key instead of one pair per session.
#
# The backend serves ChaCha20-Poly1305 sessions. Sessions that negotiated AES-256-GCM
# (docs/wire.md 2.2; SessionCrypto.aes) are sealed and opened whole by libsodium (_aes_seal,
# _aes_open) whatever the backend, and in pieces by libcrypto: they exist only where libsodium
# has AES-256-GCM (AES_GCM), so no backend switch can leave one without its cipher.
#
# All run with the GIL held for the whole call and share module-level state, which the GIL
# serialises: the EVP contexts and the _CBuffer windows (cryptography may release the GIL inside
# a call for large inputs, but it has taken its own copy of each window's pointer and length
# by then; the nonce it reads there is a fresh bytes object per call for that reason).
# ---------------------------------------------------------------------------------------------

cdef extern from *:
    """
    #ifndef MSGNET_HAVE_OPENSSL
    #define MSGNET_HAVE_OPENSSL 0
    #endif
    /* What a backend this build did not link stands for (its setup fails, so never called). */
    static int msgnet_aead_missing(const unsigned char *key, const unsigned char *nonce,
                                   const unsigned char *ad, int adlen,
                                   const unsigned char *in, int n, unsigned char *out) {
        return -1;
    }
    #if MSGNET_HAVE_OPENSSL
    #include <openssl/err.h>
    #include <openssl/evp.h>
    #include <string.h>
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
    #include <openssl/core_names.h>
    #include <openssl/params.h>
    #endif

    static const EVP_CIPHER *msgnet_cipher = NULL;
    static const EVP_CIPHER *msgnet_cipher_aes = NULL;  /* AES-256-GCM (whole packets) */
    static EVP_CIPHER_CTX *msgnet_seal_ctx = NULL;
    static EVP_CIPHER_CTX *msgnet_open_ctx = NULL;
    /* The key each context holds: a packet for the same session as the one before (the
       common case) then sets only the nonce, sparing the key schedule. */
    static unsigned char msgnet_seal_key[33];  /* [0] = 1 once a key is held */
    static unsigned char msgnet_open_key[33];
    /* AES-256-GCM packets from _EVP_AES_FROM bytes (SessionCrypto.aes): contexts of
       their own, keys held as above. libcrypto's stitched AES-GCM beats libsodium's from about
       1 KiB, even when the key changes on every packet (1171 B: 560 ns with the key held,
       761 ns re-keyed, libsodium 822 ns with its key schedule kept; 8971 B: 2.4 us against
       5.1 us; measured here). NULL where this libcrypto has no AES-256-GCM. */
    static EVP_CIPHER_CTX *msgnet_aes_seal_ctx = NULL;
    static EVP_CIPHER_CTX *msgnet_aes_open_ctx = NULL;
    static unsigned char msgnet_aes_seal_key[33];
    static unsigned char msgnet_aes_open_key[33];

    /* NULL (keep the context's key) if held is key, else key, remembered in held. */
    static const unsigned char *msgnet_key_for(unsigned char *held, const unsigned char *key) {
        if (held[0] && memcmp(held + 1, key, 32) == 0) return NULL;
        memcpy(held + 1, key, 32);
        held[0] = 1;
        return key;
    }

    /* Get (set == 0) or set the 16-byte tag. OpenSSL 3's EVP_CIPHER_CTX_ctrl translates the
       ctrl into an OSSL_PARAM list on every call (~200 ns measured on 3.0); building the list
       directly costs a tenth of that. */
    static int msgnet_evp_tag(EVP_CIPHER_CTX *ctx, int set, unsigned char *tag) {
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
        OSSL_PARAM params[2];
        params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, 16);
        params[1] = OSSL_PARAM_construct_end();
        return set ? EVP_CIPHER_CTX_set_params(ctx, params)
                   : EVP_CIPHER_CTX_get_params(ctx, params);
    #else
        return EVP_CIPHER_CTX_ctrl(ctx, set ? EVP_CTRL_AEAD_SET_TAG : EVP_CTRL_AEAD_GET_TAG,
                                   16, tag);
    #endif
    }

    /* 0 once both contexts hold the cipher; -1 if this libcrypto cannot give it (FIPS ...). */
    static int msgnet_evp_setup(void) {
        const EVP_CIPHER *cipher;
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
        /* Fetched once: passing EVP_chacha20_poly1305() would fetch it again on every init. */
        cipher = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    #else
        cipher = EVP_chacha20_poly1305();
    #endif
        if (cipher == NULL) goto fail;
        msgnet_cipher = cipher;
    #if OPENSSL_VERSION_NUMBER >= 0x30000000L
        msgnet_cipher_aes = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    #else
        msgnet_cipher_aes = EVP_aes_256_gcm();
    #endif
        ERR_clear_error();  /* no AES-256-GCM (a FIPS-less build ...): its pieces are declined */
        if (msgnet_cipher_aes != NULL) {  /* else AES packets all stay on libsodium */
            EVP_CIPHER_CTX *seal = EVP_CIPHER_CTX_new(), *open = EVP_CIPHER_CTX_new();
            if (seal != NULL && open != NULL
                    && EVP_CipherInit_ex(seal, msgnet_cipher_aes, NULL, NULL, NULL, 1) == 1
                    && EVP_CipherInit_ex(open, msgnet_cipher_aes, NULL, NULL, NULL, 0) == 1) {
                msgnet_aes_seal_ctx = seal;
                msgnet_aes_open_ctx = open;
            } else {
                EVP_CIPHER_CTX_free(seal);
                EVP_CIPHER_CTX_free(open);
                ERR_clear_error();
            }
        }
        msgnet_seal_ctx = EVP_CIPHER_CTX_new();
        msgnet_open_ctx = EVP_CIPHER_CTX_new();
        if (msgnet_seal_ctx == NULL || msgnet_open_ctx == NULL) goto fail;
        if (EVP_CipherInit_ex(msgnet_seal_ctx, cipher, NULL, NULL, NULL, 1) != 1) goto fail;
        if (EVP_CipherInit_ex(msgnet_open_ctx, cipher, NULL, NULL, NULL, 0) != 1) goto fail;
        return 0;
    fail:
        ERR_clear_error();
        return -1;
    }

    /* What seal and open share: (re)start ctx on key (unless it holds it already) and nonce,
       take the AD and process in[0:n] into out. 1 on success; on a failure the context's key
       is unknown, so held forgets it. */
    static int msgnet_evp_begin(EVP_CIPHER_CTX *ctx, unsigned char *held, int enc,
                                const unsigned char *key, const unsigned char *nonce,
                                const unsigned char *ad, int adlen,
                                const unsigned char *in, int n, unsigned char *out) {
        int len;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, msgnet_key_for(held, key), nonce, enc) != 1
                || EVP_CipherUpdate(ctx, NULL, &len, ad, adlen) != 1
                || (n > 0 && EVP_CipherUpdate(ctx, out, &len, in, n) != 1)) {
            held[0] = 0;
            return 0;
        }
        return 1;
    }

    /* ciphertext || tag (n + 16 bytes) of in[0:n] at out, AD = ad[0:adlen]; out may equal in.
       0 on success, -1 on an OpenSSL failure (none is expected once set up). */
    static int msgnet_evp_seal_on(EVP_CIPHER_CTX *ctx, unsigned char *held,
                                  const unsigned char *key, const unsigned char *nonce,
                                  const unsigned char *ad, int adlen,
                                  const unsigned char *in, int n, unsigned char *out) {
        int len;
        if (!msgnet_evp_begin(ctx, held, 1, key, nonce, ad, adlen, in, n, out)
                || EVP_CipherFinal_ex(ctx, out + n, &len) != 1
                || msgnet_evp_tag(ctx, 0, out + n) != 1) {
            ERR_clear_error();
            return -1;
        }
        return 0;
    }

    /* Decrypt in[0:n] with the tag at in[n:n+16] into out[0:n]; out may equal in. 0 if the
       tag verifies, 1 if not (out then holds unauthenticated bytes), -1 on an OpenSSL
       failure. The error queue is left empty either way: a forged packet must not leave
       state behind for other OpenSSL users of this thread. */
    static int msgnet_evp_open_on(EVP_CIPHER_CTX *ctx, unsigned char *held,
                                  const unsigned char *key, const unsigned char *nonce,
                                  const unsigned char *ad, int adlen,
                                  const unsigned char *in, int n, unsigned char *out) {
        int len;
        if (!msgnet_evp_begin(ctx, held, 0, key, nonce, ad, adlen, in, n, out)
                || msgnet_evp_tag(ctx, 1, (unsigned char *)(in + n)) != 1) {
            ERR_clear_error();
            return -1;
        }
        if (EVP_CipherFinal_ex(ctx, out + n, &len) != 1) {
            ERR_clear_error();
            return 1;
        }
        return 0;
    }

    /* ChaCha20-Poly1305 ("openssl" backend), and AES-256-GCM where msgnet_evp_aes_ready. */
    static int msgnet_evp_seal(const unsigned char *key, const unsigned char *nonce,
                               const unsigned char *ad, int adlen,
                               const unsigned char *in, int n, unsigned char *out) {
        return msgnet_evp_seal_on(msgnet_seal_ctx, msgnet_seal_key, key, nonce, ad, adlen,
                                  in, n, out);
    }
    static int msgnet_evp_open(const unsigned char *key, const unsigned char *nonce,
                               const unsigned char *ad, int adlen,
                               const unsigned char *in, int n, unsigned char *out) {
        return msgnet_evp_open_on(msgnet_open_ctx, msgnet_open_key, key, nonce, ad, adlen,
                                  in, n, out);
    }
    static int msgnet_evp_aes_ready(void) {
        return msgnet_aes_seal_ctx != NULL && msgnet_aes_open_ctx != NULL;
    }
    static int msgnet_evp_aes_seal(const unsigned char *key, const unsigned char *nonce,
                                   const unsigned char *ad, int adlen,
                                   const unsigned char *in, int n, unsigned char *out) {
        return msgnet_evp_seal_on(msgnet_aes_seal_ctx, msgnet_aes_seal_key, key, nonce, ad,
                                  adlen, in, n, out);
    }
    static int msgnet_evp_aes_open(const unsigned char *key, const unsigned char *nonce,
                                   const unsigned char *ad, int adlen,
                                   const unsigned char *in, int n, unsigned char *out) {
        return msgnet_evp_open_on(msgnet_aes_open_ctx, msgnet_aes_open_key, key, nonce, ad,
                                  adlen, in, n, out);
    }

    /* One ChaCha20-Poly1305 packet sealed or opened piece by piece (large packets on a
       stream), in a context of its own: its pieces interleave with whole packets on the
       shared contexts (AES-256-GCM ones go to cryptography: PieceCipher). NULL on an OpenSSL
       failure. */
    static void *msgnet_piece_begin(int enc, const unsigned char *key,
                                    const unsigned char *nonce,
                                    const unsigned char *ad, int adlen) {
        const EVP_CIPHER *cipher = msgnet_cipher;
        EVP_CIPHER_CTX *ctx;
        int len;
        if (cipher == NULL) return NULL;
        ctx = EVP_CIPHER_CTX_new();
        if (ctx == NULL) return NULL;
        if (EVP_CipherInit_ex(ctx, cipher, NULL, key, nonce, enc) != 1
                || EVP_CipherUpdate(ctx, NULL, &len, ad, adlen) != 1) {
            EVP_CIPHER_CTX_free(ctx);
            ERR_clear_error();
            return NULL;
        }
        return ctx;
    }

    /* The next n bytes: in[0:n] -> out[0:n] (out may equal in). 0, or -1 on a failure. */
    static int msgnet_piece_update(void *ctx, const unsigned char *in, int n,
                                   unsigned char *out) {
        int len = 0;
        if (EVP_CipherUpdate((EVP_CIPHER_CTX *)ctx, out, &len, in, n) != 1 || len != n) {
            ERR_clear_error();
            return -1;
        }
        return 0;
    }

    /* Sealing (enc): write the 16-byte tag. Opening: check it; 0 if it verifies, 1 if not.
       -1 on an OpenSSL failure. */
    static int msgnet_piece_finish(void *vctx, int enc, unsigned char *tag) {
        EVP_CIPHER_CTX *ctx = (EVP_CIPHER_CTX *)vctx;
        unsigned char none[16];
        int len;
        if (enc) {
            if (EVP_CipherFinal_ex(ctx, none, &len) != 1 || msgnet_evp_tag(ctx, 0, tag) != 1) {
                ERR_clear_error();
                return -1;
            }
            return 0;
        }
        if (msgnet_evp_tag(ctx, 1, tag) != 1) {
            ERR_clear_error();
            return -1;
        }
        if (EVP_CipherFinal_ex(ctx, none, &len) != 1) {
            ERR_clear_error();
            return 1;
        }
        return 0;
    }

    static void msgnet_piece_free(void *ctx) { EVP_CIPHER_CTX_free((EVP_CIPHER_CTX *)ctx); }
    #else
    static int msgnet_evp_setup(void) { return -1; }
    #define msgnet_evp_seal msgnet_aead_missing
    #define msgnet_evp_open msgnet_aead_missing
    static int msgnet_evp_aes_ready(void) { return 0; }
    #define msgnet_evp_aes_seal msgnet_aead_missing
    #define msgnet_evp_aes_open msgnet_aead_missing
    static void *msgnet_piece_begin(int enc, const unsigned char *key,
                                    const unsigned char *nonce,
                                    const unsigned char *ad, int adlen) { return NULL; }
    static int msgnet_piece_update(void *ctx, const unsigned char *in, int n,
                                   unsigned char *out) { return -1; }
    static int msgnet_piece_finish(void *ctx, int enc, unsigned char *tag) { return -1; }
    static void msgnet_piece_free(void *ctx) { }
    #endif
    #ifndef MSGNET_HAVE_SODIUM
    #define MSGNET_HAVE_SODIUM 0
    #endif
    #if MSGNET_HAVE_SODIUM
    #include <sodium.h>
    static int msgnet_sodium_setup(void) { return sodium_init() < 0 ? -1 : 0; }

    /* Same contract as msgnet_evp_seal; libsodium cannot fail here. */
    static int msgnet_sodium_seal(const unsigned char *key, const unsigned char *nonce,
                                  const unsigned char *ad, int adlen,
                                  const unsigned char *in, int n, unsigned char *out) {
        crypto_aead_chacha20poly1305_ietf_encrypt_detached(
            out, out + n, NULL, in, (unsigned long long)n, ad, (unsigned long long)adlen,
            NULL, nonce, key);
        return 0;
    }

    /* Same contract as msgnet_evp_open (0 verified, 1 forged). libsodium checks the tag
       before it decrypts. */
    static int msgnet_sodium_open(const unsigned char *key, const unsigned char *nonce,
                                  const unsigned char *ad, int adlen,
                                  const unsigned char *in, int n, unsigned char *out) {
        return crypto_aead_chacha20poly1305_ietf_decrypt_detached(
            out, NULL, in, (unsigned long long)n, in + n, ad, (unsigned long long)adlen,
            nonce, key) == 0 ? 0 : 1;
    }

    /* AES-256-GCM (docs/wire.md 2.2): the same contracts. libsodium has it only where the CPU
       has AES-NI and PCLMUL (msgnet_sodium_aes_available), which is when msgnet offers it. */
    static int msgnet_sodium_aes_available(void) { return crypto_aead_aes256gcm_is_available(); }

    static int msgnet_sodium_aes_seal(const unsigned char *key, const unsigned char *nonce,
                                      const unsigned char *ad, int adlen,
                                      const unsigned char *in, int n, unsigned char *out) {
        crypto_aead_aes256gcm_encrypt_detached(
            out, out + n, NULL, in, (unsigned long long)n, ad, (unsigned long long)adlen,
            NULL, nonce, key);
        return 0;
    }

    static int msgnet_sodium_aes_open(const unsigned char *key, const unsigned char *nonce,
                                      const unsigned char *ad, int adlen,
                                      const unsigned char *in, int n, unsigned char *out) {
        return crypto_aead_aes256gcm_decrypt_detached(
            out, NULL, in, (unsigned long long)n, in + n, ad, (unsigned long long)adlen,
            nonce, key) == 0 ? 0 : 1;
    }

    /* A busy AES session's two key schedules, expanded once (libsodium's precomputed state,
       crypto_aead_aes256gcm_beforenm) instead of on every packet as the calls above do:
       2 x 512 bytes, 16-byte aligned, wiped when freed. NULL when out of memory. */
    typedef struct {
        crypto_aead_aes256gcm_state send;
        crypto_aead_aes256gcm_state recv;
    } msgnet_aes_keys;

    static void *msgnet_aes_keys_new(const unsigned char *send_key,
                                     const unsigned char *recv_key) {
        msgnet_aes_keys *keys = aligned_alloc(16, sizeof(msgnet_aes_keys));
        if (keys == NULL) return NULL;
        crypto_aead_aes256gcm_beforenm(&keys->send, send_key);
        crypto_aead_aes256gcm_beforenm(&keys->recv, recv_key);
        return keys;
    }

    static void msgnet_aes_keys_free(void *keys) {
        if (keys != NULL) {
            sodium_memzero(keys, sizeof(msgnet_aes_keys));
            free(keys);
        }
    }

    /* msgnet_sodium_aes_seal and _open with the schedules of msgnet_aes_keys_new. */
    static int msgnet_aes_keys_seal(void *keys, const unsigned char *nonce,
                                    const unsigned char *ad, int adlen,
                                    const unsigned char *in, int n, unsigned char *out) {
        crypto_aead_aes256gcm_encrypt_detached_afternm(
            out, out + n, NULL, in, (unsigned long long)n, ad, (unsigned long long)adlen,
            NULL, nonce, &((msgnet_aes_keys *)keys)->send);
        return 0;
    }

    static int msgnet_aes_keys_open(void *keys, const unsigned char *nonce,
                                    const unsigned char *ad, int adlen,
                                    const unsigned char *in, int n, unsigned char *out) {
        return crypto_aead_aes256gcm_decrypt_detached_afternm(
            out, NULL, in, (unsigned long long)n, in + n, ad, (unsigned long long)adlen,
            nonce, &((msgnet_aes_keys *)keys)->recv) == 0 ? 0 : 1;
    }
    #else
    static void *msgnet_aes_keys_new(const unsigned char *send_key,
                                     const unsigned char *recv_key) { return NULL; }
    static void msgnet_aes_keys_free(void *keys) { }
    static int msgnet_aes_keys_seal(void *keys, const unsigned char *nonce,
                                    const unsigned char *ad, int adlen,
                                    const unsigned char *in, int n, unsigned char *out) {
        return -1;
    }
    static int msgnet_aes_keys_open(void *keys, const unsigned char *nonce,
                                    const unsigned char *ad, int adlen,
                                    const unsigned char *in, int n, unsigned char *out) {
        return -1;
    }
    static int msgnet_sodium_setup(void) { return -1; }
    static int msgnet_sodium_aes_available(void) { return 0; }
    #define msgnet_sodium_seal msgnet_aead_missing
    #define msgnet_sodium_open msgnet_aead_missing
    #define msgnet_sodium_aes_seal msgnet_aead_missing
    #define msgnet_sodium_aes_open msgnet_aead_missing
    #endif
    """
    const int MSGNET_HAVE_OPENSSL
    const int MSGNET_HAVE_SODIUM
    int msgnet_sodium_setup()
    int msgnet_sodium_seal(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, int adlen,
                           const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_sodium_open(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, int adlen,
                           const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_sodium_aes_available()
    void* msgnet_aes_keys_new(const uint8_t* send_key, const uint8_t* recv_key) noexcept
    void msgnet_aes_keys_free(void* keys) noexcept
    int msgnet_aes_keys_seal(void* keys, const uint8_t* nonce, const uint8_t* ad, int adlen,
                             const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_aes_keys_open(void* keys, const uint8_t* nonce, const uint8_t* ad, int adlen,
                             const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_sodium_aes_seal(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad,
                               int adlen, const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_sodium_aes_open(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad,
                               int adlen, const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_evp_setup()
    int msgnet_evp_aes_ready()
    int msgnet_evp_aes_seal(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad,
                            int adlen, const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_evp_aes_open(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad,
                            int adlen, const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_evp_seal(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, int adlen,
                        const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_evp_open(const uint8_t* key, const uint8_t* nonce, const uint8_t* ad, int adlen,
                        const uint8_t* inp, int n, uint8_t* out) noexcept
    void* msgnet_piece_begin(int enc, const uint8_t* key, const uint8_t* nonce,
                             const uint8_t* ad, int adlen) noexcept
    int msgnet_piece_update(void* ctx, const uint8_t* inp, int n, uint8_t* out) noexcept
    int msgnet_piece_finish(void* ctx, int enc, uint8_t* tag) noexcept
    void msgnet_piece_free(void* ctx) noexcept


# seal: write ciphertext || tag (n + 16 bytes) of plaintext[0:n] at sealed, AD = the 13-byte
# header; sealed may equal plaintext (in place), no other overlap.
ctypedef int (*_SealFn)(const uint8_t* key, uint64_t counter, const uint8_t* header,
                        const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1
# open: decrypt sealed[0:n + 16] (ciphertext || tag) into plaintext[0:n]; 0 if the tag
# verifies, -1 if not (plaintext[0:n] then holds unauthenticated garbage); plaintext may equal
# sealed.
ctypedef int (*_OpenFn)(const uint8_t* key, uint64_t counter, const uint8_t* header,
                        const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2

cdef _SealFn _aead_seal
cdef _OpenFn _aead_open


cdef int _evp_seal(const uint8_t* key, uint64_t counter, const uint8_t* header,
                   const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1:
    cdef uint8_t nonce[12]
    _store_nonce(nonce, counter)
    if msgnet_evp_seal(key, nonce, header, DATA_HEADER_SIZE, plaintext, <int>n, sealed) != 0:
        raise RuntimeError("libcrypto failed to seal a packet")
    return 0


cdef int _evp_open(const uint8_t* key, uint64_t counter, const uint8_t* header,
                   const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2:
    cdef uint8_t nonce[12]
    cdef int rc
    _store_nonce(nonce, counter)
    rc = msgnet_evp_open(key, nonce, header, DATA_HEADER_SIZE, sealed, <int>n, plaintext)
    if rc < 0:
        raise RuntimeError("libcrypto failed to open a packet")
    return -rc  # 1 (tag mismatch) -> -1


cdef int _sodium_seal(const uint8_t* key, uint64_t counter, const uint8_t* header,
                      const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1:
    cdef uint8_t nonce[12]
    _store_nonce(nonce, counter)
    msgnet_sodium_seal(key, nonce, header, DATA_HEADER_SIZE, plaintext, <int>n, sealed)
    return 0


cdef int _sodium_open(const uint8_t* key, uint64_t counter, const uint8_t* header,
                      const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2:
    cdef uint8_t nonce[12]
    _store_nonce(nonce, counter)
    return -msgnet_sodium_open(key, nonce, header, DATA_HEADER_SIZE, sealed, <int>n, plaintext)


# AES-256-GCM packets of at least this many bytes of plaintext go to libcrypto where it has
# the cipher (_evp_aes), smaller ones to libsodium: see msgnet_aes_seal_ctx. From
# _CRYPTOGRAPHY_AES_FROM bytes (the datagrams of a loopback path, 5.1) they go to the
# session's own cryptography AESGCM objects (SessionCrypto._large_aes), whose OpenSSL has the
# VAES/AVX-512 code that the system's may lack: measured here (OpenSSL 3.0 against
# cryptography's 4.0, 65 KB, seal or open) 16.6 us against 8.8, while its per-call set-up
# (about 1.7 us) makes it the slower below ~9 KB.
cdef enum:
    _EVP_AES_FROM = 1024
    _CRYPTOGRAPHY_AES_FROM = 32768
cdef bint _evp_aes = False  # set once libcrypto is set up, below


cdef int _aes_seal(const uint8_t* key, void* keys, uint64_t counter, const uint8_t* header,
                   const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1:
    """AES-256-GCM (docs/wire.md 2.2), whatever the backend: libsodium, which has it only
    where it is fast, and is the only way a session gets it (AES_GCM), with the session's
    precomputed key schedules (keys, see SessionCrypto._aes_keys_now) if it has them; from
    _EVP_AES_FROM bytes libcrypto, where linked."""
    cdef uint8_t nonce[12]
    _store_nonce(nonce, counter)
    if n >= _EVP_AES_FROM and _evp_aes:
        if msgnet_evp_aes_seal(key, nonce, header, DATA_HEADER_SIZE, plaintext, <int>n,
                               sealed) != 0:
            raise RuntimeError("libcrypto failed to seal a packet")
    elif keys != NULL:
        msgnet_aes_keys_seal(keys, nonce, header, DATA_HEADER_SIZE, plaintext, <int>n, sealed)
    else:
        msgnet_sodium_aes_seal(key, nonce, header, DATA_HEADER_SIZE, plaintext, <int>n, sealed)
    return 0


cdef int _aes_open(const uint8_t* key, void* keys, uint64_t counter, const uint8_t* header,
                   const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2:
    cdef uint8_t nonce[12]
    cdef int rc
    _store_nonce(nonce, counter)
    if n >= _EVP_AES_FROM and _evp_aes:
        rc = msgnet_evp_aes_open(key, nonce, header, DATA_HEADER_SIZE, sealed, <int>n,
                                 plaintext)
        if rc < 0:
            raise RuntimeError("libcrypto failed to open a packet")
        return -rc  # 1 (tag mismatch) -> -1
    if keys != NULL:
        return -msgnet_aes_keys_open(keys, nonce, header, DATA_HEADER_SIZE, sealed, <int>n,
                                     plaintext)
    return -msgnet_sodium_aes_open(key, nonce, header, DATA_HEADER_SIZE, sealed, <int>n,
                                   plaintext)


# "sodium+openssl": libsodium below this many bytes of plaintext, libcrypto from it on. Measured
# here (callgrind, seal+open): libsodium 10.1k instructions at 64 B against 12.2k, and its
# shorter call path costs less again when caches are cold (a request/response round trip:
# -12% instructions, -15% wall time); from about 512 B OpenSSL's AVX2/AVX-512 code is ahead
# (1200 B: 28.1k against 31.0k).
cdef enum:
    _SODIUM_BELOW = 512


cdef int _mixed_seal(const uint8_t* key, uint64_t counter, const uint8_t* header,
                     const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1:
    if n < _SODIUM_BELOW:
        return _sodium_seal(key, counter, header, plaintext, n, sealed)
    return _evp_seal(key, counter, header, plaintext, n, sealed)


cdef int _mixed_open(const uint8_t* key, uint64_t counter, const uint8_t* header,
                     const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2:
    if n < _SODIUM_BELOW:
        return _sodium_open(key, counter, header, sealed, n, plaintext)
    return _evp_open(key, counter, header, sealed, n, plaintext)


# The cryptography backend's state: its ChaCha20Poly1305 objects by key (at most
# _AEAD_CACHE_SIZE, oldest dropped first), and three windows re-aimed per call.
cdef enum:
    _AEAD_CACHE_SIZE = 64
cdef dict _aeads = {}
cdef _CBuffer _win_in = _CBuffer(False)
cdef _CBuffer _win_ad = _CBuffer(False)
cdef _CBuffer _win_out = _CBuffer(True)


cdef object _aead_for(const uint8_t* key):
    cdef bytes k = PyBytes_FromStringAndSize(<const char*>key, 32)
    aead = _aeads.get(k)
    if aead is None:
        if len(_aeads) >= _AEAD_CACHE_SIZE:
            del _aeads[next(iter(_aeads))]
        aead = _aeads[k] = ChaCha20Poly1305(k)
    return aead


cdef inline bytes _nonce_bytes(uint64_t counter):
    cdef uint8_t nonce[12]
    _store_nonce(nonce, counter)
    return PyBytes_FromStringAndSize(<const char*>nonce, 12)


cdef int _cryptography_seal(const uint8_t* key, uint64_t counter, const uint8_t* header,
                            const uint8_t* plaintext, Py_ssize_t n,
                            uint8_t* sealed) except -1:
    return _seal_with(_aead_for(key), counter, header, plaintext, n, sealed)


cdef int _cryptography_open(const uint8_t* key, uint64_t counter, const uint8_t* header,
                            const uint8_t* sealed, Py_ssize_t n,
                            uint8_t* plaintext) except -2:
    return _open_with(_aead_for(key), counter, header, sealed, n, plaintext)


cdef int _seal_with(object aead, uint64_t counter, const uint8_t* header,
                    const uint8_t* plaintext, Py_ssize_t n, uint8_t* sealed) except -1:
    """One DATA payload sealed by a cryptography AEAD object (ChaCha20Poly1305, AESGCM)."""
    aead.encrypt_into(
        _nonce_bytes(counter),
        _aim(_win_in, plaintext, n),
        _aim(_win_ad, header, DATA_HEADER_SIZE),
        _aim(_win_out, sealed, n + AEAD_TAG_SIZE),
    )
    return 0


cdef int _open_with(object aead, uint64_t counter, const uint8_t* header,
                    const uint8_t* sealed, Py_ssize_t n, uint8_t* plaintext) except -2:
    """_seal_with's opening: 0, or -1 if the tag does not verify."""
    try:
        aead.decrypt_into(
            _nonce_bytes(counter),
            _aim(_win_in, sealed, n + AEAD_TAG_SIZE),
            _aim(_win_ad, header, DATA_HEADER_SIZE),
            _aim(_win_out, plaintext, n),
        )
    except InvalidTag:
        return -1
    return 0


HAVE_OPENSSL = bool(MSGNET_HAVE_OPENSSL) and msgnet_evp_setup() == 0
# MSGNET_EVP_AES=0 keeps every AES packet on libsodium (to compare the two).
_evp_aes = (HAVE_OPENSSL and msgnet_evp_aes_ready()
            and os.environ.get("MSGNET_EVP_AES", "1") != "0")
EVP_AES_FROM = _EVP_AES_FROM if _evp_aes else None  # for tests: where libcrypto takes AES over
HAVE_SODIUM = bool(MSGNET_HAVE_SODIUM) and msgnet_sodium_setup() == 0
# Whether this process offers AES-256-GCM for DATA (the handshake flag, docs/wire.md 2.3.1):
# where libsodium has it, i.e. the CPU has AES-NI and PCLMUL. MSGNET_AES_GCM=0 turns it off
# (sessions then use ChaCha20-Poly1305 whatever the peer offers).
AES_GCM = (HAVE_SODIUM and msgnet_sodium_aes_available() == 1
           and os.environ.get("MSGNET_AES_GCM", "1") != "0")
# The backends this build can use, preferred first.
AEAD_BACKENDS = (
    (("sodium+openssl",) if HAVE_SODIUM and HAVE_OPENSSL else ())
    + (("sodium",) if HAVE_SODIUM else ())
    + (("openssl",) if HAVE_OPENSSL else ())
    + ("cryptography",)
)
# The backend in use: what tests and benchmarks print. set_aead_backend() changes it.
AEAD_BACKEND = None
# Whether large stream packets are sealed and opened piece by piece (PieceCipher): with
# libcrypto's EVP, which takes a packet in pieces; the other backends take it whole.
cdef bint _pieces = False


def set_aead_backend(str name not None) -> str:
    """Switch every session of this process to the AEAD backend ``name`` (one of
    AEAD_BACKENDS); returns the previous one. For tests and benchmarks: both backends produce
    identical packets, so this may happen at any time. ``MSGNET_AEAD_BACKEND`` picks one at
    import."""
    global AEAD_BACKEND, _aead_seal, _aead_open, _pieces
    if name not in AEAD_BACKENDS:
        raise UsageError(f"AEAD backend {name!r} is not available (have {AEAD_BACKENDS})")
    previous = AEAD_BACKEND
    if name == "sodium+openssl":
        _aead_seal = _mixed_seal
        _aead_open = _mixed_open
    elif name == "sodium":
        _aead_seal = _sodium_seal
        _aead_open = _sodium_open
    elif name == "openssl":
        _aead_seal = _evp_seal
        _aead_open = _evp_open
    else:
        _aead_seal = _cryptography_seal
        _aead_open = _cryptography_open
        _aeads.clear()
    _pieces = name in ("sodium+openssl", "openssl")
    AEAD_BACKEND = name
    return previous


set_aead_backend(os.environ.get("MSGNET_AEAD_BACKEND") or AEAD_BACKENDS[0])


cdef object _dropped(int code):
    exc = ProtocolViolation(f"packet dropped: {DROP_REASON_NAMES[-code]}")
    exc.reason = DROP_REASON_NAMES[-code]
    return exc


cdef object _not_data(uint8_t packet_type):
    """open_into is only for DATA and PLAIN_DATA; the engine dispatches on the type first."""
    exc = FrameError(f"packet type 0x{packet_type:02x} is not DATA or PLAIN_DATA")
    exc.reason = "not_data"
    return exc


cdef int _copy_key(object key, uint8_t* out) except -1:
    """Copy a 32-byte key (any buffer) into out; UsageError (a ValueError) for another length,
    as ChaCha20Poly1305 itself refuses one."""
    cdef Py_buffer view
    PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
    try:
        if view.len != 32:
            raise UsageError("ChaCha20-Poly1305 keys are 32 bytes")
        memcpy(out, view.buf, 32)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef class SessionCrypto:
    """Keys, counters and replay window of one session, both directions (docs/wire.md §2.2).

    In plaintext mode (§2.6, negotiated by both ends) packets are PLAIN_DATA and the keys are
    ignored. ``send_counter`` lets tests start near the counter limit. Not thread-safe: its
    counters and window belong to one owner (the engine's loop).
    """

    def __init__(self, uint32_t local_index, uint32_t remote_index, send_key, recv_key,
                 bint plaintext=False, uint64_t send_counter=0, bint aes=False):
        if aes and (plaintext or not AES_GCM):
            raise UsageError("AES-256-GCM is not available here" if not plaintext
                             else "a plaintext session has no cipher")
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = send_counter
        self.plaintext = plaintext
        self.aes = aes
        self.window = ReplayWindow()
        if not plaintext:
            if send_key is None or recv_key is None:
                raise UsageError("an encrypted session needs both keys")
            _copy_key(send_key, self._send_key)
            _copy_key(recv_key, self._recv_key)

    def __dealloc__(self):
        memset(self._send_key, 0, 32)
        memset(self._recv_key, 0, 32)
        msgnet_aes_keys_free(self._aes_keys)
        self._aes_keys = NULL

    cdef object _large_aes(self, bint sealing):
        """cryptography's AESGCM for this session's sending (sealing) or receiving key: large
        AES-256-GCM packets (_CRYPTOGRAPHY_AES_FROM). Made on the first such packet and held
        by the session, so no key outlives it in a shared cache."""
        if sealing:
            if self._aes_sealer is None:
                self._aes_sealer = AESGCM(PyBytes_FromStringAndSize(<const char*>self._send_key,
                                                                    32))
            return self._aes_sealer
        if self._aes_opener is None:
            self._aes_opener = AESGCM(PyBytes_FromStringAndSize(<const char*>self._recv_key, 32))
        return self._aes_opener

    cdef void* _aes_keys_now(self) noexcept:
        """The precomputed AES key schedules of this session (1 KiB, made once, see
        msgnet_aes_keys_new), from its AES_KEYS_AFTER-th packet sealed or opened on: a busy
        session saves expanding a key on every packet (a quarter of sealing 64 bytes), an
        idle one (10,000 may be held) does not pay 1 KiB for them. NULL before, or if out
        of memory (then each packet expands its key, as before)."""
        if self._aes_keys == NULL:
            self._aes_packets += 1
            if self._aes_packets >= _AES_KEYS_AFTER:
                self._aes_keys = msgnet_aes_keys_new(self._send_key, self._recv_key)
        return self._aes_keys

    cdef Py_ssize_t seal_into(self, const uint8_t* payload, Py_ssize_t n,
                              uint8_t* out, Py_ssize_t cap) except -3:
        cdef uint64_t counter = self.send_counter
        cdef Py_ssize_t total = n + (DATA_HEADER_SIZE if self.plaintext else DATA_OVERHEAD)
        if counter >= _REJECT_AFTER:
            return -1
        if cap < total:
            return -2
        if self.aes and not self._count_sealed(n):
            return -1
        out[0] = PACKET_PLAIN_DATA if self.plaintext else PACKET_DATA
        _store_u32_be(out + 1, self.remote_index)
        _store_u64_be(out + 5, counter)
        if self.plaintext:
            memmove(out + DATA_HEADER_SIZE, payload, n)
        elif self.aes and n >= _CRYPTOGRAPHY_AES_FROM:
            _seal_with(self._large_aes(True), counter, out, payload, n, out + DATA_HEADER_SIZE)
        elif self.aes:
            _aes_seal(self._send_key, self._aes_keys_now(), counter, out, payload, n,
                      out + DATA_HEADER_SIZE)
        else:
            _aead_seal(self._send_key, counter, out, payload, n, out + DATA_HEADER_SIZE)
        self.send_counter = counter + 1
        return total

    @property
    def sealed_bytes(self) -> int:
        """AES-256-GCM: payload bytes sealed so far, against AES_GCM_REJECT_AFTER_BYTES."""
        return self._sealed_bytes

    @sealed_bytes.setter
    def sealed_bytes(self, uint64_t value):
        """For tests: start near the limit, as send_counter does for its own."""
        self._sealed_bytes = value

    cdef bint _count_sealed(self, Py_ssize_t n) noexcept:
        """Add n bytes to what this AES-256-GCM session sealed; False (nothing added) once
        that would pass AES_GCM_REJECT_AFTER_BYTES (docs/wire.md 2.3.2)."""
        if self._sealed_bytes + <uint64_t>n > _AES_REJECT_AFTER_BYTES:
            return False
        self._sealed_bytes += <uint64_t>n
        return True

    cdef int open_into(self, const uint8_t* pkt, Py_ssize_t n, uint8_t* out, Py_ssize_t cap,
                       Py_ssize_t* out_len) except -100:
        cdef Py_ssize_t payload_len
        cdef uint64_t counter
        cdef int rc = 0
        if n < DATA_HEADER_SIZE:
            return DROP_TRUNCATED
        if pkt[0] == PACKET_DATA:
            if n < DATA_OVERHEAD:
                return DROP_TRUNCATED
            payload_len = n - DATA_OVERHEAD
        elif pkt[0] == PACKET_PLAIN_DATA:
            payload_len = n - DATA_HEADER_SIZE
        else:
            raise _not_data(pkt[0])
        if _load_u32_be(pkt + 1) != self.local_index:
            return DROP_WRONG_SESSION
        if (pkt[0] == PACKET_PLAIN_DATA) != self.plaintext:
            return DROP_PLAINTEXT_REFUSED
        counter = _load_u64_be(pkt + 5)
        if counter >= _REJECT_AFTER:
            return DROP_COUNTER_EXHAUSTED
        if not self.window.check(counter):
            return DROP_REPLAY
        if cap < payload_len:
            return DROP_OUT_OF_ROOM
        if self.plaintext:
            memmove(out, pkt + DATA_HEADER_SIZE, payload_len)
        elif self.aes and payload_len >= _CRYPTOGRAPHY_AES_FROM:  # as seal_into chooses
            rc = _open_with(self._large_aes(False), counter, pkt, pkt + DATA_HEADER_SIZE,
                            payload_len, out)
        elif self.aes:
            rc = _aes_open(self._recv_key, self._aes_keys_now(), counter, pkt,
                           pkt + DATA_HEADER_SIZE, payload_len, out)
        else:
            rc = _aead_open(self._recv_key, counter, pkt, pkt + DATA_HEADER_SIZE, payload_len,
                            out)
        if rc != 0:
            memset(out, 0, payload_len)  # no unauthenticated plaintext left for a caller to misuse
            return DROP_AUTH_FAILED
        if not self.window.update(counter):
            return DROP_REPLAY
        out_len[0] = payload_len
        return OPEN_OK

    def seal(self, const uint8_t[::1] payload not None) -> bytes:
        """Seal payload as the next DATA (or PLAIN_DATA) packet; ClosedError once the send
        counter reaches REJECT_AFTER_MESSAGES (or AES-256-GCM its byte limit)."""
        cdef Py_ssize_t n = payload.shape[0]
        cdef Py_ssize_t size = n + (DATA_HEADER_SIZE if self.plaintext else DATA_OVERHEAD)
        cdef bytes packet = PyBytes_FromStringAndSize(NULL, size)
        cdef const uint8_t* src = &payload[0] if n else <const uint8_t*>b""
        if self.seal_into(src, n, <uint8_t*>PyBytes_AS_STRING(packet), size) == -1:
            if self.send_counter < _REJECT_AFTER:
                raise ClosedError("AES-256-GCM usage limit reached (AES_GCM_REJECT_AFTER_BYTES)")
            raise ClosedError("send counter exhausted (REJECT_AFTER_MESSAGES)")
        return packet

    def open(self, const uint8_t[::1] packet not None) -> bytes:
        """The payload of packet, or ProtocolViolation whose ``reason`` is the drop counter."""
        cdef Py_ssize_t n = packet.shape[0]
        cdef Py_ssize_t cap = max(n - (DATA_HEADER_SIZE if self.plaintext else DATA_OVERHEAD), 0)
        cdef Py_ssize_t out_len = 0
        cdef const uint8_t* src = &packet[0] if n else <const uint8_t*>b""
        cdef bytes payload = PyBytes_FromStringAndSize(NULL, cap)
        cdef int result = self.open_into(src, n, <uint8_t*>PyBytes_AS_STRING(payload), cap,
                                         &out_len)
        if result != OPEN_OK:
            raise _dropped(result)
        return payload

    def tag_of(self, const uint8_t[::1] packet not None) -> bytes:
        """The 16-byte tag of a DATA packet this session sealed: what SESSION_UNKNOWN echoes."""
        cdef Py_ssize_t n = packet.shape[0]
        if self.plaintext:
            raise UsageError("PLAIN_DATA packets carry no tag")
        if n < DATA_OVERHEAD or packet[0] != PACKET_DATA:
            raise FrameError("not a DATA packet")
        return PyBytes_FromStringAndSize(<const char*>&packet[n - AEAD_TAG_SIZE], AEAD_TAG_SIZE)


cdef class PieceCipher:
    """Seals or opens one DATA packet piece by piece: the same bytes as seal_into and
    open_into, for packets that are large enough for the time to matter. On a stream the
    sender then writes each piece as soon as it is sealed and the receiver opens each piece
    as it arrives, so the two ends' encryption overlaps instead of adding up. Nothing opened
    may be used before finish() verified the tag (docs/wire.md §6).

    AES-256-GCM packets go to cryptography's incremental GCM (its OpenSSL has the VAES code
    the system's may lack, as for whole packets: _CRYPTOGRAPHY_AES_FROM), ChaCha20-Poly1305
    ones to libcrypto's."""

    def __dealloc__(self):
        if self._ctx != NULL:
            msgnet_piece_free(self._ctx)

    cdef int update(self, const uint8_t* inp, Py_ssize_t n, uint8_t* out) except -1:
        if self._aes is not None:
            self._aes.update_into(_aim(_win_in, inp, n), _aim(_win_out, out, n))
            return 0
        if self._ctx == NULL or msgnet_piece_update(self._ctx, inp, <int>n, out) != 0:
            raise RuntimeError("libcrypto failed on a packet piece")
        return 0

    cdef int finish(self, uint8_t* tag) except -100:
        """Sealing: write the tag at tag; OPEN_OK. Opening: check the tag at tag and then the
        replay window (updating it); OPEN_OK, DROP_AUTH_FAILED or DROP_REPLAY."""
        cdef int rc = 0
        if self._aes is not None:
            aes, self._aes = self._aes, None
            if self._sealing:
                aes.finalize()
                memcpy(tag, PyBytes_AS_STRING(aes.tag), AEAD_TAG_SIZE)
            else:
                try:
                    aes.finalize_with_tag(PyBytes_FromStringAndSize(<const char*>tag,
                                                                    AEAD_TAG_SIZE))
                except InvalidTag:
                    rc = 1
        elif self._ctx == NULL:
            raise RuntimeError("packet piece cipher already finished")
        else:
            rc = msgnet_piece_finish(self._ctx, self._sealing, tag)
            msgnet_piece_free(self._ctx)
            self._ctx = NULL
        if rc < 0:
            raise RuntimeError("libcrypto failed to finish a packet")
        if self._sealing:
            return OPEN_OK
        if rc != 0:
            return DROP_AUTH_FAILED
        if not self._crypto.window.update(self.counter):
            return DROP_REPLAY
        return OPEN_OK


cdef PieceCipher seal_pieces(SessionCrypto crypto, uint8_t* out, Py_ssize_t n):
    cdef uint64_t counter = crypto.send_counter
    cdef uint8_t nonce[12]
    cdef void* ctx
    cdef PieceCipher cipher
    if not _pieces or crypto.plaintext or counter >= _REJECT_AFTER:
        return None
    if crypto.aes and crypto._sealed_bytes + <uint64_t>n > _AES_REJECT_AFTER_BYTES:
        return None  # seal_into, on the whole packet, refuses it
    out[0] = PACKET_DATA
    _store_u32_be(out + 1, crypto.remote_index)
    _store_u64_be(out + 5, counter)
    _store_nonce(nonce, counter)
    if crypto.aes:
        cipher = _piece_cipher(NULL, True, counter, None)
        cipher._aes = _gcm(crypto._send_key, nonce, out, None)
        crypto._count_sealed(n)
    else:
        ctx = msgnet_piece_begin(1, crypto._send_key, nonce, out, DATA_HEADER_SIZE)
        if ctx == NULL:
            return None
        cipher = _piece_cipher(ctx, True, counter, None)
    crypto.send_counter = counter + 1
    return cipher


cdef PieceCipher open_pieces(SessionCrypto crypto, const uint8_t* header):
    cdef uint64_t counter = _load_u64_be(header + 5)
    cdef uint8_t nonce[12]
    cdef void* ctx
    cdef PieceCipher cipher
    if (not _pieces or crypto.plaintext or header[0] != PACKET_DATA
            or _load_u32_be(header + 1) != crypto.local_index
            or counter >= _REJECT_AFTER or not crypto.window.check(counter)):
        return None  # open_into, on the whole packet, says why it is dropped
    _store_nonce(nonce, counter)
    if crypto.aes:
        cipher = _piece_cipher(NULL, False, counter, crypto)
        cipher._aes = _gcm(crypto._recv_key, nonce, header, crypto)
        return cipher
    ctx = msgnet_piece_begin(0, crypto._recv_key, nonce, header, DATA_HEADER_SIZE)
    if ctx == NULL:
        return None
    return _piece_cipher(ctx, False, counter, crypto)


cdef object _gcm(const uint8_t* key, const uint8_t* nonce, const uint8_t* header,
                 SessionCrypto opening):
    """cryptography's AES-256-GCM encryptor (opening None) or decryptor for one packet, its
    header authenticated."""
    mode = modes.GCM(PyBytes_FromStringAndSize(<const char*>nonce, 12))
    cipher = Cipher(algorithms.AES(PyBytes_FromStringAndSize(<const char*>key, 32)), mode)
    gcm = cipher.encryptor() if opening is None else cipher.decryptor()
    gcm.authenticate_additional_data(PyBytes_FromStringAndSize(<const char*>header,
                                                               DATA_HEADER_SIZE))
    return gcm


cdef PieceCipher _piece_cipher(void* ctx, bint sealing, uint64_t counter, SessionCrypto crypto):
    cdef PieceCipher cipher = PieceCipher.__new__(PieceCipher)
    cipher._ctx = ctx
    cipher._sealing = sealing
    cipher.counter = counter
    cipher._crypto = crypto
    return cipher


def seal_in_pieces(SessionCrypto crypto not None, const uint8_t[::1] payload not None,
                   sizes) -> bytes | None:
    """For tests: payload sealed as one DATA packet in pieces of the given sizes (the last
    takes the rest); None where seal_pieces declines (no libcrypto, plaintext...)."""
    cdef Py_ssize_t n = payload.shape[0]
    cdef bytes packet = PyBytes_FromStringAndSize(NULL, n + DATA_OVERHEAD)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(packet)
    cdef Py_ssize_t pos = 0, k
    cdef PieceCipher cipher = seal_pieces(crypto, out, n)
    if cipher is None:
        return None
    for size in list(sizes) + [n]:
        k = min(<Py_ssize_t>size, n - pos)
        if k > 0:
            cipher.update(&payload[pos], k, out + DATA_HEADER_SIZE + pos)
            pos += k
    cipher.finish(out + DATA_HEADER_SIZE + n)
    return packet


def open_in_pieces(SessionCrypto crypto not None, const uint8_t[::1] packet not None,
                   sizes) -> bytes | None:
    """For tests: the payload of packet opened in pieces of the given sizes; None where
    open_pieces declines; ProtocolViolation (as open) if the tag or the window refuse it."""
    cdef Py_ssize_t n = packet.shape[0] - DATA_OVERHEAD
    cdef bytearray work = bytearray(packet)
    cdef uint8_t* buf = <uint8_t*>PyByteArray_AS_STRING(work)
    cdef Py_ssize_t pos = 0, k
    cdef int rc
    cdef PieceCipher cipher
    if n < 0:
        raise FrameError("shorter than a DATA packet")
    cipher = open_pieces(crypto, buf)
    if cipher is None:
        return None
    for size in list(sizes) + [n]:
        k = min(<Py_ssize_t>size, n - pos)
        if k > 0:
            cipher.update(buf + DATA_HEADER_SIZE + pos, k, buf + DATA_HEADER_SIZE + pos)
            pos += k
    rc = cipher.finish(buf + DATA_HEADER_SIZE + n)
    if rc != OPEN_OK:
        raise _dropped(rc)
    return bytes(work[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n])


# Fixed-layout stateless packets (§2.4, §2.5, §2.7): cold paths, built and read from Python.

cdef bytes _new_packet(uint8_t packet_type, uint32_t receiver_index, Py_ssize_t size):
    cdef bytes packet = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(packet)
    p[0] = packet_type
    _store_u32_be(p + 1, receiver_index)
    return packet


cdef const uint8_t* _expect(const uint8_t[::1] data, uint8_t packet_type, Py_ssize_t size,
                            bint exact) except NULL:
    """data's bytes, once its type and length are those of the layout; FrameError otherwise."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0 or data[0] != packet_type:
        raise FrameError(f"not a packet of type 0x{packet_type:02x}")
    if n < size or (exact and n != size):
        raise FrameError(f"packet of type 0x{packet_type:02x} has wrong length {n}")
    return &data[0]


def encode_session_unknown(uint32_t receiver_index, uint64_t counter,
                           const uint8_t[::1] tag not None) -> bytes:
    """SESSION_UNKNOWN echoing a DATA packet's index, counter and tag (§2.5)."""
    if tag.shape[0] != AEAD_TAG_SIZE:
        raise UsageError("tag must be 16 bytes")
    cdef bytes packet = _new_packet(PACKET_SESSION_UNKNOWN, receiver_index, _SESSION_UNKNOWN_SIZE)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(packet)
    _store_u64_be(p + 5, counter)
    memmove(p + DATA_HEADER_SIZE, &tag[0], AEAD_TAG_SIZE)
    return packet


def decode_session_unknown(const uint8_t[::1] data not None) -> tuple:
    """(receiver_index, counter, tag) of a SESSION_UNKNOWN packet."""
    cdef const uint8_t* p = _expect(data, PACKET_SESSION_UNKNOWN, _SESSION_UNKNOWN_SIZE, True)
    return (_load_u32_be(p + 1), _load_u64_be(p + 5),
            PyBytes_FromStringAndSize(<const char*>p + DATA_HEADER_SIZE, AEAD_TAG_SIZE))


def encode_cookie(uint32_t receiver_index, const uint8_t[::1] cookie not None) -> bytes:
    """COOKIE carrying cookie to the initiator whose sender_index is receiver_index (§2.4)."""
    if cookie.shape[0] != _COOKIE_SIZE:
        raise UsageError("cookie must be 16 bytes")
    cdef bytes packet = _new_packet(PACKET_COOKIE, receiver_index, _COOKIE_PACKET_SIZE)
    memmove(<uint8_t*>PyBytes_AS_STRING(packet) + 5, &cookie[0], _COOKIE_SIZE)
    return packet


def decode_cookie(const uint8_t[::1] data not None) -> tuple:
    """(receiver_index, cookie) of a COOKIE packet."""
    cdef const uint8_t* p = _expect(data, PACKET_COOKIE, _COOKIE_PACKET_SIZE, True)
    return _load_u32_be(p + 1), PyBytes_FromStringAndSize(<const char*>p + 5, _COOKIE_SIZE)


def encode_version_unsupported(uint32_t receiver_index, versions) -> bytes:
    """VERSION_UNSUPPORTED listing the versions we speak (§2.7)."""
    cdef bytes listed = bytes(versions)  # ValueError for a version outside 0..255
    cdef Py_ssize_t count = len(listed)
    if count > 255:
        raise UsageError("at most 255 versions")
    cdef bytes packet = _new_packet(PACKET_VERSION_UNSUPPORTED, receiver_index,
                                    _VERSION_HEADER_SIZE + count)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(packet)
    p[5] = <uint8_t>count
    memmove(p + _VERSION_HEADER_SIZE, PyBytes_AS_STRING(listed), count)
    return packet


def decode_version_unsupported(const uint8_t[::1] data not None) -> tuple:
    """(receiver_index, versions) of a VERSION_UNSUPPORTED packet."""
    cdef const uint8_t* p = _expect(data, PACKET_VERSION_UNSUPPORTED, _VERSION_HEADER_SIZE, False)
    if data.shape[0] != _VERSION_HEADER_SIZE + p[5]:
        raise FrameError("VERSION_UNSUPPORTED length does not match its version_count")
    return _load_u32_be(p + 1), tuple(
        PyBytes_FromStringAndSize(<const char*>p + _VERSION_HEADER_SIZE, p[5]))


def peek_receiver_index(const uint8_t[::1] data not None) -> int:
    """receiver_index of a DATA, PLAIN_DATA, FINISH, SESSION_UNKNOWN or COOKIE packet: the
    key the receiver routes on before anything is authenticated."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0 or data[0] not in (PACKET_DATA, PACKET_PLAIN_DATA, PACKET_FINISH,
                                 PACKET_SESSION_UNKNOWN, PACKET_COOKIE):
        raise FrameError("packet type carries no receiver_index at offset 1")
    if n < 5:
        raise FrameError("packet too short for a receiver_index")
    return _load_u32_be(&data[1])


# Benchmark helpers: C-level loops, so the harness's Python call overhead does not dominate.

def bench_seal_open(SessionCrypto sender, SessionCrypto receiver, bytes payload, Py_ssize_t n,
                    bint seal_in_place=False) -> bytes:
    """n times: seal payload with sender, open it in place with receiver; returns the last
    payload opened (the tests check the in-place paths with it). seal_in_place copies the
    payload to its place in the packet first and seals it there, as an engine that builds
    frames in its send buffer would."""
    cdef Py_ssize_t size = len(payload)
    cdef bytearray buf = bytearray(size + DATA_OVERHEAD)
    cdef uint8_t* b = <uint8_t*>PyByteArray_AS_STRING(buf)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(payload)
    cdef const uint8_t* src = p
    cdef Py_ssize_t i, length, out_len = 0
    if seal_in_place:
        src = b + DATA_HEADER_SIZE
    for i in range(n):
        if seal_in_place:
            memmove(b + DATA_HEADER_SIZE, p, size)
        length = sender.seal_into(src, size, b, size + DATA_OVERHEAD)
        if receiver.open_into(b, length, b + DATA_HEADER_SIZE, size, &out_len) != OPEN_OK:
            raise AssertionError("benchmark packet did not open")
    return bytes(buf[DATA_HEADER_SIZE:DATA_HEADER_SIZE + out_len])


def bench_aead(aead, Py_ssize_t size, Py_ssize_t n):
    """The baseline: n times cryptography's encrypt() then decrypt() of size bytes with a
    13-byte associated data, called from C like bench_seal_open."""
    cdef bytes nonce = bytes(12)
    cdef bytes payload = bytes(size)
    cdef bytes header = bytes(DATA_HEADER_SIZE)
    cdef Py_ssize_t i
    for i in range(n):
        aead.decrypt(nonce, aead.encrypt(nonce, payload, header), header)
