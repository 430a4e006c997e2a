"""api tokens: bearer tokens of the HTTP API, kept as digests

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from callguard.books.database import table_options
from callguard.books.models import Moment

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', _ID, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=True),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', Moment, nullable=False),
    sa.Column('revoked_at', Moment, nullable=True),
    sa.CheckConstraint("scope IN ('read', 'money', 'admin')", name='ck_api_tokens_scope'),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('digest'),
    **table_options(op.get_bind()),
    )


def downgrade() -> None:
    op.drop_table('api_tokens')
