from __future__ import annotations

from django import forms

from shop.models import Product


class ProductForm(forms.ModelForm):
    class Meta:
        model = Product
        fields = ["name", "price"]


class OrderForm(forms.Form):
    product = forms.IntegerField(min_value=1, label="Product #")
    quantity = forms.IntegerField(min_value=1, max_value=99, initial=1)
