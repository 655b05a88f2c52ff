/*
 * xla_ffi.h - fastxent's XLA FFI handler (xla_ffi.c), as the binding sees it.
 */
#ifndef FASTXENT_XLA_FFI_H
#define FASTXENT_XLA_FFI_H

/* The handler, an XLA_FFI_Handler (XLA FFI API version 1), as the address a
   PyCapsule holds for jax.ffi.register_ffi_target. */
void *fx_xla_handler_address(void);

/* The thread count of calls whose "threads" attribute is 0 (num_threads=None):
   fastxent.set_num_threads's count, or 0 to read OpenMP's at each call. */
extern int fx_xla_default_threads;

#endif
