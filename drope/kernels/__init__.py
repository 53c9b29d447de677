"""Triton kernels. Imports torch and triton only, never transformers."""
